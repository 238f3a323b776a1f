"""The libvirt backend: each VM is a persistent libvirt domain named after its id.

``domain`` builds the domain XML (a pure function, golden-tested); ``backend`` drives libvirtd
over libvirt-python and implements ``vmm.backend.base.VmBackend``.
"""
