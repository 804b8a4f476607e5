"""The admission webhook: AdmissionReview handling (pure) and its HTTPS server (aiohttp)."""
