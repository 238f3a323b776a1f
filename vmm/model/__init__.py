"""What a VM is: manifest, compose, images, work directory, in-memory record, CID pool."""
