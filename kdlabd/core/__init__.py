"""Use cases and models. Pure asyncio: no libvirt, no D-Bus, no lxml, no host I/O here."""
