// SPDX-License-Identifier: Apache-2.0
//! A tiny real KVM guest that proves, from the host, that guest instructions execute.
//!
//! The guest is nine bytes of 16-bit real-mode code that counts forever and writes the count to
//! [`COUNTER_PORT`]. Every `out` is a VM exit, so the host sees each increment, and the vCPU thread
//! gets control back every few microseconds: that is what lets [`GuestControl::pause`] park it without
//! signals or `immediate_exit`.
//!
//! The VM is created *paused*: memory, vCPU and registers are set up and the vCPU thread is spawned,
//! but it blocks before its first `KVM_RUN` until [`GuestControl::start`].

use std::ptr::NonNull;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, error};
use vmm_sys_util::errno;

use crate::gate::{guest_control, Gate, GuestControl, GuestStateError, WorkerGuard};

/// The I/O port the dummy guest writes its 32-bit counter to (a port no real device uses here:
/// this VM has no devices at all).
pub const COUNTER_PORT: u16 = 0x0700;

/// Guest-physical address where the code is loaded and where the vCPU starts.
const GUEST_CODE_ADDR: u64 = 0x1000;
/// One page of guest memory holds the code.
const GUEST_MEM_SIZE: usize = 0x1000;
/// Where KVM may put the real-mode TSS (needed by Intel CPUs without "unrestricted guest").
const TSS_ADDR: usize = 0xfffb_d000;
/// KVM's real-mode TSS takes three pages from `TSS_ADDR`.
const TSS_SIZE: u64 = 3 * 0x1000;
/// With CS base 0 and a 16-bit IP, real-mode code must lie below 64 KiB.
const REAL_MODE_IP_LIMIT: u64 = 0x1_0000;

/// The guest program (16-bit real mode):
///
/// ```text
/// 0: ba 00 07    mov  dx, 0x0700     ; COUNTER_PORT
/// 3: 66 40       inc  eax            ; the counter (eax starts at 0)
/// 5: 66 ef       out  dx, eax        ; VM exit: the host reads the new value
/// 7: eb fa       jmp  3
/// ```
pub const GUEST_CODE: [u8; 9] = [
    0xba,
    (COUNTER_PORT & 0xff) as u8,
    (COUNTER_PORT >> 8) as u8,
    0x66,
    0x40,
    0x66,
    0xef,
    0xeb,
    0xfa,
];

pub use crate::gate::{DEFAULT_PAUSE_TIMEOUT, DEFAULT_START_TIMEOUT};

/// Errors of the dummy KVM guest.
#[derive(Debug, thiserror::Error)]
pub enum KvmDummyError {
    /// `/dev/kvm` does not exist.
    #[error(
        "/dev/kvm does not exist: this host has no KVM (enable VT-x/AMD-V or nested virtualization \
         and load kvm_intel or kvm_amd), or use the simulated VM instead"
    )]
    KvmMissing,
    /// `/dev/kvm` exists but this user may not open it.
    #[error(
        "permission denied opening /dev/kvm: add this user to the `kvm` group \
         (`sudo usermod -aG kvm $USER`, then log in again) or run as root"
    )]
    KvmPermission,
    /// `/dev/kvm` exists but no KVM module backs it.
    #[error(
        "/dev/kvm exists but KVM is not usable ({0}): load kvm_intel or kvm_amd, \
         or use the simulated VM instead"
    )]
    KvmNoDevice(#[source] errno::Error),
    /// Another error opening `/dev/kvm`.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] errno::Error),
    /// `/dev/kvm` opened but does not answer `KVM_GET_API_VERSION` with 12.
    #[error(
        "/dev/kvm is not a KVM device (KVM_GET_API_VERSION answered {0}, expected 12), \
         or use the simulated VM instead"
    )]
    KvmNotKvm(i32),
    /// A KVM ioctl failed while setting the VM up.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: errno::Error,
    },
    /// A guest address computation does not fit in 64 bits.
    #[error(
        "guest address overflow: {what} at {base:#x} + {len:#x} bytes does not fit in 64 bits"
    )]
    AddressOverflow {
        /// What was being placed.
        what: &'static str,
        /// Its guest-physical start.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The guest layout is inconsistent (a constant of this module is wrong).
    #[error("invalid guest layout: {0}")]
    BadLayout(&'static str),
    /// A write into guest memory would end outside it.
    #[error(
        "cannot write {len} bytes at offset {offset:#x} of guest memory: it holds {size:#x} bytes"
    )]
    OutOfGuestMemory {
        /// Where the write starts.
        offset: usize,
        /// How many bytes.
        len: usize,
        /// The size of the guest memory.
        size: usize,
    },
    /// The guest memory could not be mapped.
    #[error("cannot map {GUEST_MEM_SIZE} bytes of guest memory: {0}")]
    GuestMemory(#[source] std::io::Error),
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn the vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// Starting or pausing failed.
    #[error(transparent)]
    State(#[from] GuestStateError),
}

fn kvm_err(op: &'static str) -> impl FnOnce(errno::Error) -> KvmDummyError {
    move |source| KvmDummyError::Kvm { op, source }
}

/// Anonymous memory that backs the guest's only memory slot; unmapped on drop.
struct GuestMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; only the vCPU thread touches it after
// setup, and the guest writes to it only through KVM.
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    fn new(len: usize) -> Result<Self, KvmDummyError> {
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KvmDummyError::GuestMemory(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| {
            KvmDummyError::GuestMemory(std::io::Error::other("mmap returned NULL"))
        })?;
        Ok(GuestMemory { ptr, len })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) -> Result<(), KvmDummyError> {
        let out_of_bounds = || KvmDummyError::OutOfGuestMemory {
            offset,
            len: bytes.len(),
            size: self.len,
        };
        let end = offset.checked_add(bytes.len()).ok_or_else(out_of_bounds)?;
        if end > self.len {
            return Err(out_of_bounds());
        }
        // SAFETY: `offset..end` lies within the mapping (checked above, without overflow); the
        // mapping is valid and writable for `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            );
        };
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing uses them after this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Everything the vCPU thread owns. Field order is drop order: the vCPU and the VM are closed
/// before the memory that KVM maps into the guest is unmapped.
struct VcpuContext {
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    _mem: GuestMemory,
}

/// Extends the guest's 32-bit counter to 64 bits across wrap-arounds.
#[derive(Default)]
struct WideCounter {
    high: u64,
    last: u32,
}

impl WideCounter {
    fn update(&mut self, value: u32) -> u64 {
        if value < self.last {
            self.high += 1 << 32;
        }
        self.last = value;
        self.high | u64::from(value)
    }
}

fn vcpu_loop(mut ctx: VcpuContext, gate: Arc<Gate>) {
    let _finish = WorkerGuard(gate.clone());
    let mut counter = WideCounter::default();
    while gate.wait_runnable() {
        // The run deadline (split-brain guard), as close to the entry as possible: checked before
        // every KVM_RUN, also after an EINTR, so a process continued after SIGSTOP past its
        // deadline never enters the guest again. See `GuestControl::set_run_deadline`.
        if !gate.may_enter() {
            continue;
        }
        let outcome = match ctx.vcpu.run() {
            Ok(VcpuExit::IoOut(COUNTER_PORT, data)) if data.len() == 4 => {
                Ok(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
            }
            Ok(exit) => Err(format!("unexpected vCPU exit: {exit:?}")),
            // Interrupted before or during entry: nothing ran, just enter again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        match outcome {
            Ok(value) => gate.record_exit(counter.update(value)),
            Err(why) => {
                error!("kvm-dummy: {why}; the vCPU thread stops");
                gate.fail(why);
                return;
            }
        }
    }
    debug!(
        "kvm-dummy: vCPU thread exits after {} guest exits",
        gate.exits()
    );
}

/// Opens `/dev/kvm`, mapping the usual failures to errors that say what to do.
fn open_kvm() -> Result<Kvm, KvmDummyError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmDummyError::KvmMissing,
        libc::EACCES | libc::EPERM => KvmDummyError::KvmPermission,
        libc::ENXIO | libc::ENODEV => KvmDummyError::KvmNoDevice(e),
        _ => KvmDummyError::KvmOpen(e),
    })?;
    // Opening proves little (a container may bind something else over /dev/kvm): ask it.
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(KvmDummyError::KvmNotKvm(v)),
    }
}

/// `base + len`, or [`KvmDummyError::AddressOverflow`] naming `what`.
fn end_of(what: &'static str, base: u64, len: u64) -> Result<u64, KvmDummyError> {
    base.checked_add(len)
        .ok_or(KvmDummyError::AddressOverflow { what, base, len })
}

/// Checks the guest layout (all of it with checked arithmetic) and returns the entry point.
fn check_layout(code_addr: u64, mem_size: u64, code_len: u64) -> Result<u64, KvmDummyError> {
    let slot_end = end_of("the memory slot", code_addr, mem_size)?;
    let code_end = end_of("the guest code", code_addr, code_len)?;
    if code_end > slot_end {
        return Err(KvmDummyError::BadLayout(
            "the guest code does not fit in the memory slot",
        ));
    }
    if code_end > REAL_MODE_IP_LIMIT {
        return Err(KvmDummyError::BadLayout(
            "the guest code must end below 64 KiB (real mode with CS base 0 reaches no further)",
        ));
    }
    let tss_start = TSS_ADDR as u64;
    let tss_end = end_of("the real-mode TSS", tss_start, TSS_SIZE)?;
    if code_addr < tss_end && tss_start < slot_end {
        return Err(KvmDummyError::BadLayout(
            "the memory slot overlaps the real-mode TSS",
        ));
    }
    // The code starts at the start of the slot.
    Ok(code_addr)
}

fn setup() -> Result<VcpuContext, KvmDummyError> {
    let mem_size = GUEST_MEM_SIZE as u64;
    let entry = check_layout(GUEST_CODE_ADDR, mem_size, GUEST_CODE.len() as u64)?;
    // Created first so that it is dropped last: on every early return below, as in
    // `VcpuContext`, the vCPU and VM fds are closed before the memory they map is unmapped
    // (locals drop in reverse order).
    let mut mem = GuestMemory::new(GUEST_MEM_SIZE)?;
    mem.write(0, &GUEST_CODE)?;
    let kvm = open_kvm()?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // Intel CPUs without "unrestricted guest" emulate real mode through vm86 and need a TSS;
    // elsewhere this is harmless.
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;

    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_CODE_ADDR,
        memory_size: mem_size,
        userspace_addr: mem.ptr.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region is a valid mapping of GUEST_MEM_SIZE bytes that lives in the same
    // VcpuContext as the VM and is unmapped only after the VM and vCPU fds are closed.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    // Flat real mode: CS base 0 so that IP is the physical address of the code.
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = entry;
    regs.rax = 0;
    regs.rflags = 2; // bit 1 is reserved and must be set
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

    Ok(VcpuContext {
        vcpu,
        _vm: vm,
        _kvm: kvm,
        _mem: mem,
    })
}

/// A tiny real KVM guest, created paused. Cheap to clone: clones share the same VM, so the CLI can
/// keep one to read the counter while the takeover core owns another as its hook. Its controls
/// (start, pause, counter, ...) are [`GuestControl`]'s, which it derefs to.
#[derive(Clone, Debug)]
pub struct DummyVm(GuestControl);

guest_control!(DummyVm);

impl DummyVm {
    /// Checks that `/dev/kvm` opens and answers as KVM, without creating a VM.
    pub fn probe() -> Result<(), KvmDummyError> {
        open_kvm().map(drop)
    }

    /// Creates the VM paused: memory, vCPU and registers are set up and the vCPU thread waits
    /// before its first `KVM_RUN`. The counter is the last value the guest wrote to
    /// [`COUNTER_PORT`]. When the last clone goes, the vCPU thread is stopped (the guest exits on
    /// every `out`, so within microseconds) and joined.
    pub fn new() -> Result<Self, KvmDummyError> {
        let ctx = setup()?;
        let control = GuestControl::spawn("kvm-dummy", "kvm-dummy-vcpu0", move |gate| {
            vcpu_loop(ctx, gate);
        })
        .map_err(KvmDummyError::Spawn)?;
        debug!("kvm-dummy: VM created paused");
        Ok(DummyVm(control))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_counter_extends_across_wrap() {
        let mut c = WideCounter::default();
        assert_eq!(c.update(1), 1);
        assert_eq!(c.update(u32::MAX), u64::from(u32::MAX));
        assert_eq!(c.update(0), 1 << 32);
        assert_eq!(c.update(5), (1 << 32) + 5);
    }

    #[test]
    fn layout_is_checked_without_overflow() {
        assert_eq!(
            check_layout(
                GUEST_CODE_ADDR,
                GUEST_MEM_SIZE as u64,
                GUEST_CODE.len() as u64
            )
            .unwrap(),
            GUEST_CODE_ADDR
        );
        let err = check_layout(u64::MAX - 0xfff, 0x1000, 9).unwrap_err();
        assert!(
            matches!(
                err,
                KvmDummyError::AddressOverflow {
                    what: "the memory slot",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not fit in 64 bits"), "{err}");
        assert!(matches!(
            check_layout(0x1000, 8, 9),
            Err(KvmDummyError::BadLayout(_))
        ));
        assert!(matches!(
            check_layout(0xf000, 0x2000, 0x1001),
            Err(KvmDummyError::BadLayout(_))
        ));
        assert!(matches!(
            check_layout(TSS_ADDR as u64 - 0x1000, 0x2000, 9),
            Err(KvmDummyError::BadLayout(_))
        ));
    }

    #[test]
    fn writes_outside_guest_memory_are_errors() {
        let mut mem = GuestMemory::new(0x1000).unwrap();
        mem.write(0x1000 - 9, &GUEST_CODE).unwrap();
        for offset in [0x1000 - 8, 0x1000, usize::MAX - 4] {
            let err = mem.write(offset, &GUEST_CODE).unwrap_err();
            assert!(
                matches!(err, KvmDummyError::OutOfGuestMemory { len: 9, .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn guest_code_encodes_the_port() {
        assert_eq!(
            u16::from_le_bytes([GUEST_CODE[1], GUEST_CODE[2]]),
            COUNTER_PORT
        );
        // The jump goes back to `inc eax` at offset 3: next ip (9) + rel8 (-6).
        assert_eq!(9 + i32::from(GUEST_CODE[8] as i8), 3);
    }
}
