"""The targets an exported project builds for: compilers, flags, emulators, memory sizes."""
from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass

from ..errors import EdgetuneError, UsageError

KB = 1024


class ToolchainError(EdgetuneError):
    """A compiler or emulator a target needs is not installed."""


@dataclass(frozen=True)
class Target:
    name: str
    kind: str                   # "linux" or "mcu"
    description: str
    cc: str                     # the compiler the Makefile calls
    cc_package: str             # the Debian package that provides it
    pointer_bytes: int
    flash_bytes: int = 0        # mcu: the part's flash (the linker's FLASH region)
    ram_bytes: int = 0          # mcu: RAM when no --budget is given
    qemu: str = ""              # the emulator that runs it here ("" for host)
    qemu_package: str = ""
    machine: str = ""           # qemu-system-arm -M
    cpu_flags: str = ""
    #: Bytes of static data besides the arena: the device struct, libc and startup (mcu:
    #: measured with arm-none-eabi-gcc 12 and newlib 4.3 on the example program).
    statics: int = 0
    stack: int = 0              # mcu: the stack the linker script reserves
    #: mcu: the project files that differ between processor families (templates/).
    startup_template: str = "mcu_startup.c"
    header_template: str = "et_mcu.h"
    linker_template: str = "mcu.ld"
    makefile_template: str = "Makefile.mcu"
    libc: str = "newlib"

    def compiler(self) -> str:
        """The compiler to use here (a native one on a board of the target's architecture)."""
        if self.name == "aarch64-linux" and platform.machine() in ("aarch64", "arm64"):
            return "cc"
        return self.cc

    def missing_tools(self, *, run: bool = False) -> list[str]:
        """What is not installed, each with the Debian package that provides it."""
        out = []
        cc = self.compiler()
        if shutil.which(cc) is None:
            out.append(f"the compiler '{cc}' (Debian package {self.cc_package})")
        if run and self.qemu and not (self.name == "aarch64-linux" and cc == "cc") and shutil.which(self.qemu) is None:
            out.append(f"the emulator '{self.qemu}' (Debian package {self.qemu_package})")
        return out

    def check_tools(self, *, run: bool = False) -> None:
        missing = self.missing_tools(run=run)
        if missing:
            raise ToolchainError(f"target {self.name} needs {' and '.join(missing)}: install it "
                                 f"(apt-get install {' '.join(sorted({m.split('package ')[1].rstrip(')') for m in missing}))}), "
                                 f"or export with --no-toolchain-check to build the project elsewhere")


_RISCV = {"startup_template": "riscv_startup.c", "header_template": "et_mcu_riscv.h",
          "linker_template": "riscv.ld", "makefile_template": "Makefile.riscv", "libc": "picolibc"}

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("host", "linux", "this machine (Linux, the C compiler 'cc')", "cc", "gcc", pointer_bytes=8, statics=8 * KB),
    Target("aarch64-linux", "linux", "64-bit ARM Linux board, e.g. Raspberry Pi Zero 2 W (Cortex-A53)",
           "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", pointer_bytes=8, qemu="qemu-aarch64",
           qemu_package="qemu-user", statics=8 * KB),
    Target("cortex-m4", "mcu", "Cortex-M4F microcontroller (1 MB flash, 256 KB RAM; QEMU mps2-an386)",
           "arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi", pointer_bytes=4,
           flash_bytes=1024 * KB, ram_bytes=256 * KB, qemu="qemu-system-arm", qemu_package="qemu-system-arm",
           machine="mps2-an386", cpu_flags="-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16",
           statics=1536, stack=4 * KB),
    Target("cortex-m7", "mcu", "Cortex-M7F microcontroller (2 MB flash, 512 KB RAM; QEMU mps2-an500)",
           "arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi", pointer_bytes=4,
           flash_bytes=2048 * KB, ram_bytes=512 * KB, qemu="qemu-system-arm", qemu_package="qemu-system-arm",
           machine="mps2-an500", cpu_flags="-mcpu=cortex-m7 -mthumb -mfloat-abi=hard -mfpu=fpv5-d16",
           statics=1536, stack=4 * KB),
    # RISC-V parts on QEMU's virt board, built with Debian's riscv64-unknown-elf-gcc (multilib
    # rv32) and picolibc 1.8: the example program's statics besides the arena measured 1.3 KB
    # (skip2-lora, damage1); the 1.5 KB of the Cortex-M targets is kept as the bound.
    Target("riscv32", "mcu", "RISC-V RV32IMAC microcontroller, no FPU, like an ESP32-C3 (4 MB flash, 400 KB RAM; "
           "QEMU virt)", "riscv64-unknown-elf-gcc", "gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf",
           pointer_bytes=4, flash_bytes=4096 * KB, ram_bytes=400 * KB, qemu="qemu-system-riscv32",
           qemu_package="qemu-system-misc", machine="virt", cpu_flags="-march=rv32imac -mabi=ilp32",
           statics=1536, stack=4 * KB, **_RISCV),
    Target("riscv32f", "mcu", "RISC-V RV32IMAFC microcontroller with a single-precision FPU (4 MB flash, "
           "400 KB RAM; QEMU virt)", "riscv64-unknown-elf-gcc", "gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf",
           pointer_bytes=4, flash_bytes=4096 * KB, ram_bytes=400 * KB, qemu="qemu-system-riscv32",
           qemu_package="qemu-system-misc", machine="virt", cpu_flags="-march=rv32imafc -mabi=ilp32f",
           statics=1536, stack=4 * KB, **_RISCV),
)}

#: The emulated machines' memories (QEMU's mps2 boards): code at 0, data at 0x20000000.
QEMU_MEMORY = 4096 * KB


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UsageError(f"unknown target '{name}': use one of {', '.join(TARGETS)}")
    return TARGETS[name]
