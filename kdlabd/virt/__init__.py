"""The libvirt backend: domain XML, storage pools and volumes, the connection."""
