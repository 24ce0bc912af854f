"""Image operations, each declaring its writes per phase in a Transaction: bitmaps,
resize, snapshots, check (scan, then repair), create and convert."""
