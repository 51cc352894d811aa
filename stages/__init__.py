"""The pipeline's stages (download, train, report) and the modules they share."""
