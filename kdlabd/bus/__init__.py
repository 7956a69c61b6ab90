"""D-Bus adapters: caller identity, authorization, wire types, error names."""
