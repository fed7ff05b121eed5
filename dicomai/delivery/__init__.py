"""Delivery: result objects returned to destinations over C-STORE or STOW-RS, with retries."""
