"""Kernel knowledge both sides need, in one place.

- :mod:`~kdlab.kernel.findings`: a problem found in a kernel's config or in a
  boot (:class:`~kdlab.kernel.findings.Finding`) and how bad it is.
- :mod:`~kdlab.kernel.guest`: what a kdlab VM gives the kernel it boots.
- :mod:`~kdlab.kernel.bzimage`: what a bzImage says about itself.
- :mod:`~kdlab.kernel.kconfig`: which ``.config`` boots and debugs in a kdlab VM.
- :mod:`~kdlab.kernel.initramfs`: the ``/init`` of kdlab's initramfs and the
  catalogue of the lines it prints.
- :mod:`~kdlab.kernel.diagnosis`: what went wrong in a boot, from its console log.

Pure functions on bytes and text: no file is opened, no process started.
"""
