"""Small helpers shared across Membrain."""
