"""Durable store-and-forward: C-STORE data sets kept on disk until STOW-RS stored them."""
