"""Use cases and models. Pure asyncio: no libvirt, D-Bus, lxml or host I/O here."""
