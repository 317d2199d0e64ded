"""Herald the node: composes the broker, storage and (later) the product engines, and the
``herald`` command line."""
