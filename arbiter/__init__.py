"""The arbiter: judge, claim extraction, CAWS governance schemas and metrics."""
