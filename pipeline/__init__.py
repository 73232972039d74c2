"""The Ray Data job and the command line: manifests in, sharded SDEdit datasets out."""
