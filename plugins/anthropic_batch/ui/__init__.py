"""The Batches page: a FastAPI app (pages + JSON) over the storage root, mounted by the plugin."""
