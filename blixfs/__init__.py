"""blixfs core: content-addressed store, namespace, virtual filesystem. Never imports pyfuse3."""
