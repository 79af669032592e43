"""What leaves and enters a site: publish, pull, the exchange client, site kits, assets, trust."""
