"""Drives a VMM through its Firecracker API socket with the `firecracker-python` client
library (PyPI, pinned in requirements.txt): the library's own `Api` class and its
requests + requests-unixsocket session, nothing hand-written on the HTTP side.

Usage: fc_client.py SOCKET KERNEL
Prints one line per step and `CLIENT-OK` at the end; exits non-zero on the first failure.
"""
import sys

from firecracker.api import Api
from firecracker.exceptions import APIError


def step(name):
    print(f"client: {name}", flush=True)


def main():
    sock, kernel = sys.argv[1], sys.argv[2]
    api = Api(sock)
    try:
        state = api.describe.get().json()["state"]
        assert state == "Not started", state
        step("GET / says Not started")

        api.machine_config.put(vcpu_count=1, mem_size_mib=64)
        api.boot.put(kernel_image_path=kernel, boot_args="console=ttyS0 reboot=k panic=1")
        cfg = api.machine_config.get().json()
        assert (cfg["vcpu_count"], cfg["mem_size_mib"]) == (1, 64), cfg
        step("machine-config and boot-source set")

        # A field this endpoint does not have: the library raises with our fault message.
        try:
            api.machine_config.put(vcpu_count=1, mem_size_mib=64, vcpus=2)
            raise AssertionError("an unknown field was accepted")
        except APIError as e:
            assert "vcpus" in str(e), e
        step("an unknown field is refused with a fault message")

        api.actions.put(action_type="InstanceStart")
        assert api.describe.get().json()["state"] == "Running"
        full = api.vm_config.get().json()
        assert full["boot-source"]["kernel_image_path"] == kernel, full
        step("InstanceStart: Running")

        api.vm.patch(state="Paused")
        assert api.describe.get().json()["state"] == "Paused"
        api.vm.patch(state="Resumed")
        assert api.describe.get().json()["state"] == "Running"
        step("paused and resumed")

        try:
            api.machine_config.put(vcpu_count=2, mem_size_mib=64)
            raise AssertionError("the machine changed after start")
        except APIError as e:
            assert "after starting" in str(e), e
        step("no machine change after start")

        api.actions.put(action_type="SendCtrlAltDel")
        step("SendCtrlAltDel sent")
    finally:
        api.close()
    print("CLIENT-OK", flush=True)


if __name__ == "__main__":
    main()
