"""Raw data formats, readers, the synthetic generator and packed shards."""
