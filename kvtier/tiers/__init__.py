"""Storage tiers: device (HBM), host (pinned) and disk."""
