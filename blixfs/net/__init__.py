"""blixfs networking: peer-to-peer byte streams between nodes.

`blixfs.net.transport` is the interface the rest of blixfs codes against (no iroh import);
`blixfs.net.iroh_transport` is the real implementation (every iroh call lives there);
`blixfs.net.memory` is an in-process implementation for tests of the layers above.
"""
