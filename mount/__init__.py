"""The FUSE layer: thin pyfuse3 handlers over blixfs.vfs."""
