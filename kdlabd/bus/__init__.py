"""D-Bus adapters: caller identity, authorization, wire types <-> models, error names."""
