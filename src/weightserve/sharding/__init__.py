"""Which bytes each rank gets: shard specs, tensor plans, and reading them."""
