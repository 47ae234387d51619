"""The shard format, converters, and the DataModule shared by every stage."""
