"""What kdlabd and kdlabctl share: bus names, errors, states, kernel knowledge.

Standard library only: kdlabctl imports it and must start without libvirt,
lxml or D-Bus bindings, and the daemon imports it without the client.
"""
