"""The service version, reported by /health, /system-status, /openapi.json and in Content Credentials."""
VERSION = "0.1.0"
