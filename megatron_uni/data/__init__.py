"""Multi-task data: the packed batch contract, task builders, webdataset pipelines."""
