"""The learning loop: the service decision log -> Parquet -> retrain -> gate -> publish -> announce."""
