// SPDX-License-Identifier: Apache-2.0
//! A tiny real KVM guest that proves, from the host, that guest instructions execute, and that can
//! be checkpointed (dirty log, registers, counter) and restored into another, never-started guest.
//!
//! The guest is a 42-byte 32-bit protected-mode program ([`GUEST_CODE`]) that counts forever and
//! writes the count to [`COUNTER_PORT`]. Every `out` is a VM exit, so the host sees each increment,
//! and the vCPU thread gets control back every few microseconds: that is what lets
//! [`GuestControl::pause`] park it without signals or `immediate_exit`. Between two increments the
//! guest asks [`DIRTY_PORT`] how many pages to dirty and writes the counter into that many pages of
//! its data area, so a configurable memory write rate ([`DummyVmConfig::dirty_rate`]) shows up in
//! KVM's dirty log.
//!
//! The VM is created *paused*: memory, vCPU and registers are set up and the vCPU thread is spawned,
//! but it blocks before its first `KVM_RUN` until [`GuestControl::start`].

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, error};
use vmm_sys_util::errno;

use crate::gate::{guest_control, Gate, GuestControl, GuestStateError, WorkerGuard};

/// The I/O port the dummy guest writes its 32-bit counter to (a port no real device uses here:
/// this VM has no devices at all).
pub const COUNTER_PORT: u16 = 0x0700;
/// The I/O port the dummy guest reads (`in eax, dx`) to learn how many pages to dirty now.
pub const DIRTY_PORT: u16 = 0x0701;
/// The guest page size: the unit of the dirty log, of checkpoints and of the dirty rate.
pub const PAGE_SIZE: usize = 4096;
/// The smallest guest memory: the code page below 64 KiB plus a data area of 64 KiB.
pub const MIN_MEM_SIZE: usize = 128 * 1024;
/// The largest guest memory: what a 32-bit guest without paging can address.
pub const MAX_MEM_SIZE: usize = 4 << 30;

/// Guest-physical address where the code is loaded and where the vCPU starts.
const GUEST_CODE_ADDR: u64 = 0x1000;
/// Start of the data area the guest dirties (it ends at the end of guest memory).
const DATA_START: u64 = 0x1_0000;
/// Where KVM may put its EPT identity-map page (Intel without "unrestricted guest" runs a guest
/// without paging on it); one page, right below the TSS.
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Where KVM may put the real-mode TSS (Intel without "unrestricted guest"); three pages.
const TSS_ADDR: u64 = 0xfffb_d000;
/// End of the identity map and TSS.
const SYSTEM_END: u64 = TSS_ADDR + 3 * 0x1000;
/// At most this many pages per answer on [`DIRTY_PORT`], so that one answer keeps the guest busy
/// for microseconds, not milliseconds (a pause or capture waits for it).
const MAX_PAGES_PER_ANSWER: u64 = 64;

/// The guest program (32-bit protected mode, flat segments, no paging). The host sets
/// `eax` = 0 (the counter), `esi` = `ebp` = the data area's start (64 KiB), `edi` = the memory
/// size (its low 32 bits: 4 GiB is 0, which `esi` reaches by wrapping, hence `jne`, not `jb`).
///
/// ```text
///  0: 40                 inc  eax            ; the counter
///  1: ba 00 07 00 00     mov  edx, 0x700     ; COUNTER_PORT
///  6: ef                 out  dx, eax        ; VM exit: the host reads the new value
///  7: 89 c3              mov  ebx, eax       ; save the counter (no stack: it would dirty memory)
///  9: ba 01 07 00 00     mov  edx, 0x701     ; DIRTY_PORT
///  e: ed                 in   eax, dx        ; VM exit: the host says how many pages to dirty
///  f: 89 c1              mov  ecx, eax
/// 11: 89 d8              mov  eax, ebx       ; restore the counter
/// 13: 85 c9              test ecx, ecx
/// 15: 74 e9              je   0x0
/// 17: 89 06              mov  [esi], eax     ; dirty one page with the counter
/// 19: 81 c6 00 10 00 00  add  esi, 0x1000
/// 1f: 39 fe              cmp  esi, edi       ; past the end of memory?
/// 21: 75 02              jne  0x25
/// 23: 89 ee              mov  esi, ebp       ; back to the data area's start
/// 25: 49                 dec  ecx
/// 26: 75 ef              jne  0x17
/// 28: eb d6              jmp  0x0
/// ```
pub const GUEST_CODE: [u8; 42] = [
    0x40,
    0xba,
    (COUNTER_PORT & 0xff) as u8,
    (COUNTER_PORT >> 8) as u8,
    0x00,
    0x00,
    0xef,
    0x89,
    0xc3,
    0xba,
    (DIRTY_PORT & 0xff) as u8,
    (DIRTY_PORT >> 8) as u8,
    0x00,
    0x00,
    0xed,
    0x89,
    0xc1,
    0x89,
    0xd8,
    0x85,
    0xc9,
    0x74,
    0xe9,
    0x89,
    0x06,
    0x81,
    0xc6,
    0x00,
    0x10,
    0x00,
    0x00,
    0x39,
    0xfe,
    0x75,
    0x02,
    0x89,
    0xee,
    0x49,
    0x75,
    0xef,
    0xeb,
    0xd6,
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
    #[error("cannot map {size} bytes of guest memory: {source}")]
    GuestMemory {
        /// The size asked for.
        size: usize,
        /// Why mmap failed.
        #[source]
        source: std::io::Error,
    },
    /// The configured guest memory size is not allowed.
    #[error(
        "guest memory size {size} bytes is not allowed: {why}; it must be a multiple of \
         {PAGE_SIZE} between {MIN_MEM_SIZE} (128 KiB) and {MAX_MEM_SIZE} (4 GiB) bytes"
    )]
    BadMemSize {
        /// The size asked for.
        size: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The vCPU thread did not pick a capture up in time.
    #[error(
        "the guest is not running (its vCPU thread did not pick the capture up within {0:?}): \
         the guest must be running to be captured"
    )]
    NotRunning(Duration),
    /// A checkpoint was applied to a guest that has already run.
    #[error(
        "the guest has already been started: a checkpoint can only be applied to a guest that \
         has never run"
    )]
    AlreadyStarted,
    /// Capture or dirty-log access on a guest created without a dirty log.
    #[error(
        "the guest has no dirty log: create it with DummyVmConfig {{ dirty_log: true, .. }} \
         to capture it or clear its log"
    )]
    NoDirtyLog,
    /// A page index beyond guest memory.
    #[error("page index {index} is out of range: the guest has {pages} pages (0..{pages})")]
    PageOutOfRange {
        /// The index asked for.
        index: u32,
        /// How many pages the guest has.
        pages: u32,
    },
    /// A checkpoint whose data does not hold exactly one page per index.
    #[error(
        "checkpoint data holds {bytes} bytes for {pages} pages: it must hold exactly \
         {PAGE_SIZE} bytes per page"
    )]
    CheckpointSize {
        /// How many page indexes.
        pages: usize,
        /// How many data bytes.
        bytes: usize,
    },
    /// Serialized vCPU state that does not decode.
    #[error("invalid serialized vCPU state: {0}")]
    BadVcpuState(String),
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

/// How a [`DummyVm`] is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DummyVmConfig {
    /// Guest memory in bytes: a multiple of [`PAGE_SIZE`] from [`MIN_MEM_SIZE`] to
    /// [`MAX_MEM_SIZE`]. The data area the guest dirties runs from 64 KiB to the end.
    pub mem_size: usize,
    /// Bytes per second the guest dirties (one 4-byte write per page, whole pages counted);
    /// 0: none.
    pub dirty_rate: u64,
    /// Enables KVM's dirty log on the memory slot (`KVM_MEM_LOG_DIRTY_PAGES`), which
    /// [`DummyVm::capture`] and [`DummyVm::clear_dirty_log`] need.
    pub dirty_log: bool,
}

impl Default for DummyVmConfig {
    /// 1 MiB, no dirtying, no dirty log.
    fn default() -> Self {
        DummyVmConfig {
            mem_size: 1 << 20,
            dirty_rate: 0,
            dirty_log: false,
        }
    }
}

impl DummyVmConfig {
    /// Checks the memory size ([`KvmDummyError::BadMemSize`] says what is allowed).
    pub fn check(&self) -> Result<(), KvmDummyError> {
        let size = self.mem_size;
        let why = if !size.is_multiple_of(PAGE_SIZE) {
            "it is not a whole number of pages"
        } else if size < MIN_MEM_SIZE {
            "it is too small"
        } else if size > MAX_MEM_SIZE {
            "it is too large"
        } else {
            return Ok(());
        };
        Err(KvmDummyError::BadMemSize { size, why })
    }

    fn pages(&self) -> u32 {
        // At most 4 GiB / 4 KiB = 2^20 pages (checked by `check`).
        (self.mem_size / PAGE_SIZE) as u32
    }
}

/// The vCPU state a checkpoint carries.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, `rip`, `rflags`.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
}

impl VcpuState {
    /// JSON (each kvm-bindings struct as an array of its bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain byte arrays into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes [`to_bytes`](Self::to_bytes)'s output. kvm-bindings' deserializer pads or cuts
    /// byte arrays of the wrong length silently, so the lengths are checked here first.
    pub fn from_bytes(b: &[u8]) -> Result<Self, KvmDummyError> {
        let bad = |why: String| KvmDummyError::BadVcpuState(why);
        let value: serde_json::Value =
            serde_json::from_slice(b).map_err(|e| bad(format!("not JSON: {e}")))?;
        for (field, len) in [
            ("regs", size_of::<kvm_regs>()),
            ("sregs", size_of::<kvm_sregs>()),
        ] {
            match value.get(field).and_then(|v| v.as_array()) {
                Some(bytes) if bytes.len() == len => {}
                Some(bytes) => {
                    return Err(bad(format!(
                        "`{field}` holds {} bytes, expected {len}",
                        bytes.len()
                    )))
                }
                None => return Err(bad(format!("`{field}` is missing or not a byte array"))),
            }
        }
        serde_json::from_value(value).map_err(|e| bad(e.to_string()))
    }
}

/// A checkpoint of a running guest, taken between two guest entries ([`DummyVm::capture`]).
#[derive(Clone, Debug)]
pub struct Capture {
    /// The 64-bit counter at the moment of the capture (the guest's `eax` holds its low 32 bits).
    pub counter: u64,
    /// The vCPU registers.
    pub vcpu: VcpuState,
    /// Page indexes (guest-physical address / [`PAGE_SIZE`]), ascending.
    pub pages: Vec<u32>,
    /// `pages.len() * PAGE_SIZE` bytes: the pages in the same order.
    pub data: Vec<u8>,
    /// How long the vCPU was held (measured on the vCPU thread).
    pub pause: Duration,
}

/// Anonymous memory that backs the guest's only memory slot; unmapped on drop.
struct GuestMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value. All host accesses are raw copies
// (never references into the mapping), so sharing it between threads creates no aliasing
// `&`/`&mut`; the guest writes it through KVM concurrently, as in every VMM.
unsafe impl Send for GuestMemory {}
// SAFETY: as for Send: `&GuestMemory` only offers bounds-checked raw copies.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    fn new(len: usize) -> Result<Self, KvmDummyError> {
        let failed = |source| KvmDummyError::GuestMemory { size: len, source };
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
            return Err(failed(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| failed(std::io::Error::other("mmap returned NULL")))?;
        Ok(GuestMemory { ptr, len })
    }

    /// `offset..offset + len` if it lies inside the mapping.
    fn range(&self, offset: usize, len: usize) -> Result<usize, KvmDummyError> {
        let out_of_bounds = || KvmDummyError::OutOfGuestMemory {
            offset,
            len,
            size: self.len,
        };
        let end = offset.checked_add(len).ok_or_else(out_of_bounds)?;
        if end > self.len {
            return Err(out_of_bounds());
        }
        Ok(end)
    }

    /// Writes host bytes into guest memory. Callers make sure the guest does not run (set-up,
    /// `apply` before the first start), so the result is what the guest will read.
    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), KvmDummyError> {
        self.range(offset, bytes.len())?;
        // SAFETY: `offset..offset + len` lies within the mapping (checked above, without
        // overflow); the mapping is valid and writable for `len` bytes and never overlaps `bytes`
        // (a host buffer).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            );
        };
        Ok(())
    }

    /// Copies guest memory out. The guest may write it meanwhile (a live copy): the copy may then
    /// mix old and new bytes, which the dirty log accounts for.
    fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), KvmDummyError> {
        self.range(offset, out.len())?;
        // SAFETY: `offset..offset + len` lies within the mapping (checked above); `out` is a host
        // buffer, not part of the mapping. A raw copy, never a reference into guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            );
        };
        Ok(())
    }

    /// Zeroes all of guest memory by dropping its pages (they read as zeros again), which is
    /// instant even for gigabytes. Only while the guest does not run.
    fn zero(&self) -> Result<(), KvmDummyError> {
        // SAFETY: `ptr`/`len` are exactly the private anonymous mapping; MADV_DONTNEED on it
        // makes later reads see zero-filled pages. No reference into the mapping exists.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(KvmDummyError::GuestMemory {
                size: self.len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing uses them after this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// What the vCPU thread is asked to do between two guest entries.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// `park`: the guest stays paused after the capture (a final checkpoint before a handoff).
    Capture { all: bool, park: bool },
}

#[derive(Default)]
struct JobSlot {
    /// Posted by the caller, taken by the vCPU thread (or withdrawn by the caller on timeout).
    request: Option<Job>,
    /// The vCPU thread took the request and is running it.
    running: bool,
    result: Option<Result<Capture, KvmDummyError>>,
}

/// One job at a time, handed to the vCPU thread. `pending` lets the vCPU thread check for a job
/// with one load per entry, without the lock.
#[derive(Default)]
struct Jobs {
    pending: AtomicBool,
    slot: Mutex<JobSlot>,
    done: Condvar,
    /// Serializes callers: one job in flight.
    one_at_a_time: Mutex<()>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data, left consistent at every unlock: a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A checkpoint's vCPU state and counter, loaded by the vCPU thread before its first entry.
struct Restore {
    vcpu: VcpuState,
    counter: u64,
}

/// What the vCPU thread and every [`DummyVm`] clone share. Field order is drop order: the VM fd
/// is closed before the memory it maps is unmapped. Every holder of this `Arc` also closes its
/// vCPU fd before dropping it (`VcpuContext` field order), so the last unmap always comes after
/// both fds are closed, whichever holder goes last.
struct Shared {
    vm: VmFd,
    mem: GuestMemory,
    _kvm: Kvm,
    config: DummyVmConfig,
    jobs: Jobs,
    restore: Mutex<Option<Restore>>,
}

impl Shared {
    fn dirty_log(&self) -> Result<Vec<u64>, KvmDummyError> {
        if !self.config.dirty_log {
            return Err(KvmDummyError::NoDirtyLog);
        }
        self.vm
            .get_dirty_log(0, self.config.mem_size)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
    }

    fn check_page(&self, index: u32) -> Result<usize, KvmDummyError> {
        let pages = self.config.pages();
        if index >= pages {
            return Err(KvmDummyError::PageOutOfRange { index, pages });
        }
        Ok(index as usize * PAGE_SIZE)
    }
}

/// Pages owed to the guest after `elapsed` at `rate` bytes/s, once `handed` were handed out,
/// capped at [`MAX_PAGES_PER_ANSWER`].
fn pages_owed(rate: u64, elapsed: Duration, handed: u64) -> u64 {
    if rate == 0 {
        return 0;
    }
    let due =
        u128::from(rate).saturating_mul(elapsed.as_nanos()) / (1_000_000_000 * PAGE_SIZE as u128);
    let due = u64::try_from(due).unwrap_or(u64::MAX);
    due.saturating_sub(handed).min(MAX_PAGES_PER_ANSWER)
}

/// The token bucket behind [`DIRTY_PORT`]: paces the guest's writes to `rate` bytes/s from its
/// first entry.
struct DirtyBucket {
    rate: u64,
    start: Option<Instant>,
    handed: u64,
}

impl DirtyBucket {
    fn answer(&mut self, now: Instant) -> u32 {
        let start = *self.start.get_or_insert(now);
        let n = pages_owed(self.rate, now.saturating_duration_since(start), self.handed);
        self.handed += n;
        // At most MAX_PAGES_PER_ANSWER.
        n as u32
    }
}

/// Everything the vCPU thread owns. Field order is drop order: the vCPU is closed before the
/// shared VM and memory are released (see `Shared`).
struct VcpuContext {
    vcpu: VcpuFd,
    shared: Arc<Shared>,
}

/// Extends the guest's 32-bit counter to 64 bits across wrap-arounds.
#[derive(Default)]
struct WideCounter {
    high: u64,
    last: u32,
}

impl WideCounter {
    /// A counter that continues from `counter` (whose low 32 bits the guest holds).
    fn from_value(counter: u64) -> Self {
        WideCounter {
            high: counter & !u64::from(u32::MAX),
            last: counter as u32,
        }
    }

    fn update(&mut self, value: u32) -> u64 {
        if value < self.last {
            self.high += 1 << 32;
        }
        self.last = value;
        self.high | u64::from(value)
    }
}

/// Loads a restored checkpoint's vCPU state (on the vCPU thread, before the first entry).
fn load_restore(ctx: &mut VcpuContext, counter: &mut WideCounter) -> Result<(), String> {
    let Some(restore) = relock(&ctx.shared.restore).take() else {
        return Ok(());
    };
    ctx.vcpu
        .set_sregs(&restore.vcpu.sregs)
        .map_err(|e| format!("KVM_SET_SREGS of the restored state failed: {e}"))?;
    ctx.vcpu
        .set_regs(&restore.vcpu.regs)
        .map_err(|e| format!("KVM_SET_REGS of the restored state failed: {e}"))?;
    *counter = WideCounter::from_value(restore.counter);
    debug!(
        "kvm-dummy: restored vCPU state loaded, counter continues from {}",
        restore.counter
    );
    Ok(())
}

/// Takes the posted job (if the caller has not withdrawn it), runs it, posts the result.
#[cold]
/// Runs the posted job (the caller goes back to the top of its loop after it).
fn run_job(ctx: &mut VcpuContext, gate: &Gate) {
    let jobs = &ctx.shared.jobs;
    let job = {
        let mut slot = relock(&jobs.slot);
        jobs.pending.store(false, Ordering::Release);
        let Some(job) = slot.request.take() else {
            return;
        };
        slot.running = true;
        job
    };
    let result = match job {
        Job::Capture { all, park } => {
            let r = capture_now(ctx, gate, all);
            // Paused before the caller hears of the capture: the state it holds is the state
            // the guest stays in.
            if park && r.is_ok() {
                gate.park_self();
            }
            r
        }
    };
    let jobs = &ctx.shared.jobs;
    let mut slot = relock(&jobs.slot);
    slot.running = false;
    slot.result = Some(result);
    jobs.done.notify_all();
}

/// The capture itself, on the vCPU thread between two entries.
fn capture_now(ctx: &mut VcpuContext, gate: &Gate, all: bool) -> Result<Capture, KvmDummyError> {
    let t0 = Instant::now();
    // After an I/O exit KVM completes the instruction (advances rip, stores an `in`'s value) only
    // at the next KVM_RUN; an entry with immediate_exit does just that and returns EINTR, so the
    // registers read below are consistent (KVM's documented way).
    ctx.vcpu.set_kvm_immediate_exit(1);
    let completed = ctx.vcpu.run().map(|_| ());
    ctx.vcpu.set_kvm_immediate_exit(0);
    match completed {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => return Err(kvm_err("KVM_RUN (immediate exit)")(e)),
        Ok(()) => {
            return Err(KvmDummyError::BadLayout(
                "KVM_RUN with immediate_exit entered the guest",
            ))
        }
    }
    let shared = &*ctx.shared;
    let bitmap = shared.dirty_log()?;
    let regs = ctx.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = ctx.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    // The vCPU thread records every counter exit before its next entry: this is the guest's.
    let counter = gate.counter();
    let mut pages = Vec::new();
    let mut data = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    for index in 0..shared.config.pages() {
        let i = index as usize;
        let logged = bitmap.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1);
        if !all && !logged {
            continue;
        }
        shared.mem.read(i * PAGE_SIZE, &mut page)?;
        if all && is_zero(&page) {
            continue;
        }
        pages.push(index);
        data.extend_from_slice(&page);
    }
    Ok(Capture {
        counter,
        vcpu: VcpuState { regs, sregs },
        pages,
        data,
        pause: t0.elapsed(),
    })
}

fn vcpu_loop(mut ctx: VcpuContext, gate: Arc<Gate>) {
    let _finish = WorkerGuard(gate.clone());
    let mut counter = WideCounter::default();
    let mut bucket = DirtyBucket {
        rate: ctx.shared.config.dirty_rate,
        start: None,
        handed: 0,
    };
    let mut first_entry = true;
    while gate.wait_runnable() {
        // The run deadline (split-brain guard), as close to the entry as possible: checked before
        // every KVM_RUN, also after an EINTR, so a process continued after SIGSTOP past its
        // deadline never enters the guest again. See `GuestControl::set_run_deadline`.
        if !gate.may_enter() {
            continue;
        }
        if first_entry {
            // KVM wants vCPU ioctls on the vCPU thread: a restored checkpoint is loaded here.
            if let Err(why) = load_restore(&mut ctx, &mut counter) {
                error!("kvm-dummy: {why}; the vCPU thread stops");
                gate.fail(why);
                return;
            }
            bucket.start = Some(Instant::now());
            first_entry = false;
        }
        // One load per entry; the lock only when a job is posted.
        // After a job, back to the top: a capture can take a while, and the run deadline and a
        // pause must be checked again right before the next entry.
        if ctx.shared.jobs.pending.load(Ordering::Acquire) {
            run_job(&mut ctx, &gate);
            continue;
        }
        let outcome = match ctx.vcpu.run() {
            Ok(VcpuExit::IoOut(COUNTER_PORT, data)) if data.len() == 4 => {
                Ok(Some(u32::from_le_bytes([
                    data[0], data[1], data[2], data[3],
                ])))
            }
            Ok(VcpuExit::IoIn(DIRTY_PORT, data)) if data.len() == 4 => {
                data.copy_from_slice(&bucket.answer(Instant::now()).to_le_bytes());
                Ok(None)
            }
            Ok(exit) => Err(format!("unexpected vCPU exit: {exit:?}")),
            // Interrupted before or during entry: nothing ran, just enter again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        match outcome {
            Ok(Some(value)) => gate.record_exit(counter.update(value)),
            Ok(None) => {}
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

/// Where things go in guest-physical memory.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    /// The entry point (the start of the code).
    entry: u64,
    /// Whether KVM's identity map and TSS (at `IDENTITY_MAP_ADDR..SYSTEM_END`) can be placed:
    /// not when the memory slot covers them (only CPUs that need neither, AMD and Intel with
    /// "unrestricted guest", can run such a guest).
    system_pages: bool,
}

/// Checks the guest layout (all of it with checked arithmetic): the memory slot from 0 of
/// `mem_size` bytes, the code at `code_addr`, the data area from `DATA_START` to the end.
fn check_layout(code_addr: u64, mem_size: u64, code_len: u64) -> Result<Layout, KvmDummyError> {
    let slot_end = end_of("the memory slot", 0, mem_size)?;
    let code_end = end_of("the guest code", code_addr, code_len)?;
    if code_end > slot_end {
        return Err(KvmDummyError::BadLayout(
            "the guest code does not fit in the memory slot",
        ));
    }
    if code_end > DATA_START {
        return Err(KvmDummyError::BadLayout(
            "the guest code must end below the data area at 64 KiB",
        ));
    }
    if slot_end <= DATA_START {
        return Err(KvmDummyError::BadLayout(
            "the memory slot must reach past the data area's start at 64 KiB",
        ));
    }
    if slot_end > 1 << 32 {
        return Err(KvmDummyError::BadLayout(
            "the memory slot must end at or below 4 GiB (a 32-bit guest without paging reaches \
             no further)",
        ));
    }
    Ok(Layout {
        entry: code_addr,
        system_pages: slot_end <= IDENTITY_MAP_ADDR,
    })
}

/// A flat 4 GiB segment (base 0, limit 0xffffffff, 4 KiB granularity, 32-bit, present, ring 0).
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn setup(cfg: DummyVmConfig) -> Result<(VcpuFd, Arc<Shared>), KvmDummyError> {
    cfg.check()?;
    let mem_size = cfg.mem_size as u64;
    let layout = check_layout(GUEST_CODE_ADDR, mem_size, GUEST_CODE.len() as u64)?;
    let mem = GuestMemory::new(cfg.mem_size)?;
    mem.write(GUEST_CODE_ADDR as usize, &GUEST_CODE)?;
    let kvm = open_kvm()?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // Moved into `Shared` at once, so that on every early return below the VM fd is closed before
    // the memory is unmapped (field order), and the vCPU fd (a local, dropped before) before both.
    let shared = Arc::new(Shared {
        vm,
        mem,
        _kvm: kvm,
        config: cfg,
        jobs: Jobs::default(),
        restore: Mutex::new(None),
    });
    let vm = &shared.vm;
    if layout.system_pages {
        // Intel CPUs without "unrestricted guest" need these (a TSS for real mode, an identity
        // map for a guest without paging); elsewhere they are harmless. Before the vCPU exists.
        vm.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    } else {
        debug!("kvm-dummy: the memory covers {IDENTITY_MAP_ADDR:#x}..{SYSTEM_END:#x}: no TSS");
    }

    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: shared.mem.ptr.as_ptr() as u64,
        flags: if cfg.dirty_log {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    };
    // SAFETY: the region is a valid mapping of `mem_size` bytes that lives in `Shared` with the
    // VM and is unmapped only after the VM and vCPU fds are closed (see `Shared`).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    // Protected mode without paging: flat code (execute/read, accessed) and data (read/write,
    // accessed) segments, CR0.PE set. The selectors are what a GDT would use; none is loaded.
    sregs.cs = flat_segment(8, 0xb);
    let data = flat_segment(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = layout.entry;
    regs.rax = 0;
    regs.rsi = DATA_START;
    regs.rbp = DATA_START;
    // The low 32 bits: 4 GiB is 0, which esi reaches by wrapping (see GUEST_CODE).
    regs.rdi = mem_size & u64::from(u32::MAX);
    regs.rflags = 2; // bit 1 is reserved and must be set
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok((vcpu, shared))
}

/// A tiny real KVM guest, created paused. Cheap to clone: clones share the same VM, so the CLI can
/// keep one to read the counter while the takeover core owns another as its hook. Its controls
/// (start, pause, counter, ...) are [`GuestControl`]'s, which it derefs to.
#[derive(Clone)]
pub struct DummyVm(GuestControl, Arc<Shared>);

guest_control!(DummyVm);

impl std::fmt::Debug for DummyVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DummyVm")
            .field(&self.0)
            .field(&self.1.config)
            .finish()
    }
}

impl DummyVm {
    /// Checks that `/dev/kvm` opens and answers as KVM, without creating a VM.
    pub fn probe() -> Result<(), KvmDummyError> {
        open_kvm().map(drop)
    }

    /// [`with_config`](Self::with_config) with the default configuration (1 MiB, no dirtying,
    /// no dirty log).
    pub fn new() -> Result<Self, KvmDummyError> {
        Self::with_config(DummyVmConfig::default())
    }

    /// Creates the VM paused: memory, vCPU and registers are set up and the vCPU thread waits
    /// before its first `KVM_RUN`. The counter is the last value the guest wrote to
    /// [`COUNTER_PORT`]. When the last clone goes, the vCPU thread is stopped (the guest exits on
    /// every `out`, so within microseconds) and joined.
    pub fn with_config(cfg: DummyVmConfig) -> Result<Self, KvmDummyError> {
        let (vcpu, shared) = setup(cfg)?;
        let ctx = VcpuContext {
            vcpu,
            shared: shared.clone(),
        };
        let control = GuestControl::spawn("kvm-dummy", "kvm-dummy-vcpu0", move |gate| {
            vcpu_loop(ctx, gate);
        })
        .map_err(KvmDummyError::Spawn)?;
        debug!("kvm-dummy: VM created paused ({cfg:?})");
        Ok(DummyVm(control, shared))
    }

    /// The configuration it was built with.
    pub fn config(&self) -> DummyVmConfig {
        self.1.config
    }

    /// How many pages guest memory holds (`mem_size / PAGE_SIZE`).
    pub fn pages(&self) -> u32 {
        self.1.config.pages()
    }

    /// Between two guest entries, on the vCPU thread (the guest does not run meanwhile):
    /// `KVM_GET_DIRTY_LOG` of the memory slot (which also clears it), then copies the pages it
    /// marks (with `all`: every page that is not all zeros, whatever the log says; the log is
    /// still cleared), the registers and the counter.
    ///
    /// Needs the dirty log ([`KvmDummyError::NoDirtyLog`] otherwise). [`KvmDummyError::NotRunning`]
    /// if the vCPU thread did not pick the job up within `timeout` (a paused or never-started
    /// guest); the job is then withdrawn, so it never runs late. Once picked up, it is waited for
    /// to the end (the vCPU thread copies memory: bounded, and the guest does not run meanwhile).
    pub fn capture(&self, all: bool, timeout: Duration) -> Result<Capture, KvmDummyError> {
        self.capture_job(Job::Capture { all, park: false }, timeout)
    }

    /// Like [`DummyVm::capture`] (dirty pages only), and the guest stays paused right after it,
    /// not one instruction later: the capture is exactly the state it is left in (a final
    /// checkpoint before a handoff). [`GuestControl::start`] resumes it.
    pub fn capture_and_pause(&self, timeout: Duration) -> Result<Capture, KvmDummyError> {
        self.capture_job(
            Job::Capture {
                all: false,
                park: true,
            },
            timeout,
        )
    }

    fn capture_job(&self, job: Job, timeout: Duration) -> Result<Capture, KvmDummyError> {
        if !self.1.config.dirty_log {
            return Err(KvmDummyError::NoDirtyLog);
        }
        let jobs = &self.1.jobs;
        let _one = relock(&jobs.one_at_a_time);
        let deadline = Instant::now() + timeout;
        let mut slot = relock(&jobs.slot);
        slot.result = None;
        slot.request = Some(job);
        jobs.pending.store(true, Ordering::Release);
        loop {
            if let Some(result) = slot.result.take() {
                return result;
            }
            let now = Instant::now();
            if now >= deadline && !slot.running {
                // Not picked up: withdraw it (under the lock the vCPU thread takes it with).
                slot.request = None;
                jobs.pending.store(false, Ordering::Release);
                return Err(KvmDummyError::NotRunning(timeout));
            }
            slot = if slot.running {
                jobs.done.wait(slot).unwrap_or_else(|e| e.into_inner())
            } else {
                jobs.done
                    .wait_timeout(slot, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            };
        }
    }

    /// Copies page `index` as it is now, while the guest may run (a live bulk copy: pages the
    /// guest writes meanwhile show up in the next capture's dirty log). `Ok(false)` if the page
    /// is all zeros (`out` then holds zeros).
    pub fn read_page(&self, index: u32, out: &mut [u8; PAGE_SIZE]) -> Result<bool, KvmDummyError> {
        let offset = self.1.check_page(index)?;
        self.1.mem.read(offset, out)?;
        Ok(!is_zero(out))
    }

    /// Clears the dirty log now (`KVM_GET_DIRTY_LOG`, result discarded): called right before a
    /// live bulk copy, so that the next capture holds what the guest wrote since. A VM ioctl: any
    /// thread may call it.
    pub fn clear_dirty_log(&self) -> Result<(), KvmDummyError> {
        self.1.dirty_log().map(drop)
    }

    /// Writes a checkpoint into this paused, never-started guest: with `reset`, first puts guest
    /// memory back to its fresh image (all zeros but the program at 0x1000, so that a guest reset
    /// for a checkpoint that lacks the code page still has code); then writes each page
    /// (`pages[i]` from `data[i * PAGE_SIZE..]`); then, if `vcpu` is given, records the vCPU state
    /// and `counter` for the vCPU thread to load before its first `KVM_RUN` (KVM wants vCPU
    /// ioctls on the vCPU thread) and sets the counter the host reports to `counter` at once. The
    /// 64-bit count then continues from `counter` (the guest's `eax` holds its low 32 bits).
    ///
    /// Refused with [`KvmDummyError::AlreadyStarted`] once the guest was ever started; `start`
    /// waits while an apply runs. Indexes and sizes are all checked before anything is written.
    pub fn apply(
        &self,
        reset: bool,
        pages: &[u32],
        data: &[u8],
        vcpu: Option<&VcpuState>,
        counter: u64,
    ) -> Result<(), KvmDummyError> {
        let gate = self.0.gate();
        let _no_start = gate.apply_lock();
        if gate.starts() > 0 {
            return Err(KvmDummyError::AlreadyStarted);
        }
        if pages.len().checked_mul(PAGE_SIZE) != Some(data.len()) {
            return Err(KvmDummyError::CheckpointSize {
                pages: pages.len(),
                bytes: data.len(),
            });
        }
        let offsets = pages
            .iter()
            .map(|&i| self.1.check_page(i))
            .collect::<Result<Vec<_>, _>>()?;
        let mem = &self.1.mem;
        if reset {
            mem.zero()?;
            mem.write(GUEST_CODE_ADDR as usize, &GUEST_CODE)?;
        }
        for (offset, page) in offsets.into_iter().zip(data.chunks_exact(PAGE_SIZE)) {
            mem.write(offset, page)?;
        }
        if let Some(vcpu) = vcpu {
            *relock(&self.1.restore) = Some(Restore {
                vcpu: vcpu.clone(),
                counter,
            });
            gate.set_counter(counter);
        }
        debug!(
            "kvm-dummy: checkpoint applied ({} pages, reset {reset}, counter {counter})",
            pages.len()
        );
        Ok(())
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
    fn wide_counter_continues_from_a_restored_value() {
        let mut c = WideCounter::from_value((3 << 32) + 7);
        // The restored guest re-executes nothing: its next out is one more.
        assert_eq!(c.update(8), (3 << 32) + 8);
        let mut c = WideCounter::from_value((1 << 32) + u64::from(u32::MAX));
        assert_eq!(c.update(0), 2 << 32);
    }

    #[test]
    fn layout_is_checked_without_overflow() {
        let mem = DummyVmConfig::default().mem_size as u64;
        assert_eq!(
            check_layout(GUEST_CODE_ADDR, mem, GUEST_CODE.len() as u64).unwrap(),
            Layout {
                entry: GUEST_CODE_ADDR,
                system_pages: true
            }
        );
        let err = check_layout(u64::MAX - 3, mem, 9).unwrap_err();
        assert!(
            matches!(
                err,
                KvmDummyError::AddressOverflow {
                    what: "the guest code",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not fit in 64 bits"), "{err}");
        let bad = |code_addr, mem_size, code_len| {
            matches!(
                check_layout(code_addr, mem_size, code_len),
                Err(KvmDummyError::BadLayout(_))
            )
        };
        // Code past the slot, code reaching into the data area, no data area, past 4 GiB.
        assert!(bad(0x1000, 0x1004, 9));
        assert!(bad(0xf000, mem, 0x1001));
        assert!(bad(0x1000, DATA_START, 9));
        assert!(bad(0x1000, (4 << 30) + 0x1000, 9));
        // The largest guest covers KVM's TSS and identity map: they are then not placed.
        let big = check_layout(GUEST_CODE_ADDR, MAX_MEM_SIZE as u64, 42).unwrap();
        assert!(!big.system_pages);
        assert!(
            check_layout(GUEST_CODE_ADDR, IDENTITY_MAP_ADDR, 42)
                .unwrap()
                .system_pages
        );
        assert!(
            !check_layout(GUEST_CODE_ADDR, IDENTITY_MAP_ADDR + 0x1000, 42)
                .unwrap()
                .system_pages
        );
        assert_eq!(SYSTEM_END, 0xfffc_0000);
    }

    #[test]
    fn memory_sizes_are_checked() {
        let cfg = |mem_size| DummyVmConfig {
            mem_size,
            ..DummyVmConfig::default()
        };
        for ok in [MIN_MEM_SIZE, 1 << 20, 64 << 20, MAX_MEM_SIZE] {
            cfg(ok).check().unwrap();
            assert!(check_layout(GUEST_CODE_ADDR, ok as u64, 42).is_ok());
        }
        for bad in [
            0,
            MIN_MEM_SIZE - PAGE_SIZE,
            MIN_MEM_SIZE + 1,
            MAX_MEM_SIZE + PAGE_SIZE,
        ] {
            let err = cfg(bad).check().unwrap_err();
            assert!(
                matches!(err, KvmDummyError::BadMemSize { size, .. } if size == bad),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("between 131072 (128 KiB)"),
                "{err}"
            );
        }
    }

    #[test]
    fn writes_and_reads_outside_guest_memory_are_errors() {
        let mem = GuestMemory::new(0x1000).unwrap();
        mem.write(0x1000 - 42, &GUEST_CODE).unwrap();
        let mut back = [0u8; 42];
        mem.read(0x1000 - 42, &mut back).unwrap();
        assert_eq!(back, GUEST_CODE);
        for offset in [0x1000 - 41, 0x1000, usize::MAX - 4] {
            let err = mem.write(offset, &GUEST_CODE).unwrap_err();
            assert!(
                matches!(err, KvmDummyError::OutOfGuestMemory { len: 42, .. }),
                "{err:?}"
            );
            assert!(mem.read(offset, &mut back).is_err());
        }
        mem.zero().unwrap();
        mem.read(0x1000 - 42, &mut back).unwrap();
        assert!(is_zero(&back));
    }

    #[test]
    fn guest_code_encodes_the_ports_and_jumps() {
        assert_eq!(
            u32::from_le_bytes([GUEST_CODE[2], GUEST_CODE[3], GUEST_CODE[4], GUEST_CODE[5]]),
            u32::from(COUNTER_PORT)
        );
        assert_eq!(GUEST_CODE[6], 0xef, "out dx, eax");
        assert_eq!(
            u32::from_le_bytes([
                GUEST_CODE[10],
                GUEST_CODE[11],
                GUEST_CODE[12],
                GUEST_CODE[13]
            ]),
            u32::from(DIRTY_PORT)
        );
        assert_eq!(GUEST_CODE[14], 0xed, "in eax, dx");
        // The page stride is PAGE_SIZE (add esi, imm32).
        assert_eq!(
            u32::from_le_bytes([
                GUEST_CODE[27],
                GUEST_CODE[28],
                GUEST_CODE[29],
                GUEST_CODE[30]
            ]),
            PAGE_SIZE as u32
        );
        // rel8 jumps: (offset of the jump's last byte + 1) + rel8 = target.
        let target = |at: usize| (at as i32 + 1) + i32::from(GUEST_CODE[at] as i8);
        assert_eq!(target(0x16), 0x0, "je top");
        assert_eq!(target(0x22), 0x25, "jne next");
        assert_eq!(target(0x27), 0x17, "jne dirty");
        assert_eq!(target(0x29), 0x0, "jmp top");
        assert_eq!(target(0x29) as usize, 0);
        assert_eq!(GUEST_CODE.len(), 0x2a);
    }

    #[test]
    fn token_bucket_paces_and_caps() {
        let s = Duration::from_secs(1);
        assert_eq!(pages_owed(0, s * 100, 0), 0);
        // 8 pages/s: 1 s owes 8, minus what was handed out.
        let rate = 8 * PAGE_SIZE as u64;
        assert_eq!(pages_owed(rate, s, 0), 8);
        assert_eq!(pages_owed(rate, s, 5), 3);
        assert_eq!(pages_owed(rate, s, 8), 0);
        assert_eq!(pages_owed(rate, s, 100), 0);
        assert_eq!(pages_owed(rate, s / 2, 0), 4);
        // A backlog is paid out at most MAX_PAGES_PER_ANSWER at a time.
        assert_eq!(pages_owed(rate, s * 100, 0), MAX_PAGES_PER_ANSWER);
        assert_eq!(pages_owed(u64::MAX, Duration::MAX, 0), MAX_PAGES_PER_ANSWER);

        let t0 = Instant::now();
        let mut b = DirtyBucket {
            rate,
            start: Some(t0),
            handed: 0,
        };
        assert_eq!(b.answer(t0), 0);
        assert_eq!(b.answer(t0 + s), 8);
        assert_eq!(b.answer(t0 + s), 0);
        assert_eq!(b.answer(t0 + s * 2), 8);
        assert_eq!(b.handed, 16);
    }

    #[test]
    fn vcpu_state_round_trips_and_rejects_bad_bytes() {
        let mut state = VcpuState {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
        };
        state.regs.rip = 0x1017;
        state.regs.rax = 0xdead_beef;
        state.sregs.cs = flat_segment(8, 0xb);
        let back = VcpuState::from_bytes(&state.to_bytes()).unwrap();
        assert_eq!(back.regs, state.regs);
        assert_eq!(back.sregs, state.sregs);
        for bad in [
            &b"not json"[..],
            br#"{"regs": [1, 2], "sregs": []}"#,
            br#"{"sregs": []}"#,
        ] {
            let err = VcpuState::from_bytes(bad).unwrap_err();
            assert!(matches!(err, KvmDummyError::BadVcpuState(_)), "{err:?}");
        }
    }
}
