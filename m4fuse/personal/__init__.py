"""What stays at a hospital: the personal weight sets and strategies,
fine-tuning, the site's own store, a new site joining."""
