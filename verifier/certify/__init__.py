"""Certificates: upper bounds on the Wasserstein distributionally robust risk (method §2–§4)."""
