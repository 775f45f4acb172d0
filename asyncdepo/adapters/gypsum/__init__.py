"""gypsum (ArtifactDB): the adapter, its REST API client, the upload session and the presigned-PUT writer."""
