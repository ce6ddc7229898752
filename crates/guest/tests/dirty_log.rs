// SPDX-License-Identifier: Apache-2.0
//! Checkpointing the dummy KVM guest on the real `/dev/kvm`: the dirty log sees the guest's
//! writes, a capture clears it, a capture never runs late, and a checkpoint applied into a fresh
//! guest continues its counter and its memory.

mod common;

use std::time::{Duration, Instant};

use common::vm_or_skip;
use vmm_takeover_guest::{DummyVm, DummyVmConfig, GuestStateError, KvmDummyError, PAGE_SIZE};

/// Generous bound for events that normally take microseconds (loaded CI machines).
const EVENT_BOUND: Duration = Duration::from_secs(10);
/// The data area the guest dirties starts at 64 KiB.
const FIRST_DATA_PAGE: u32 = 0x1_0000 / PAGE_SIZE as u32;

fn dirtying(mem_size: usize, dirty_rate: u64) -> DummyVmConfig {
    DummyVmConfig {
        mem_size,
        dirty_rate,
        dirty_log: true,
    }
}

fn word(data: &[u8], page: usize) -> u32 {
    let at = page * PAGE_SIZE;
    u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
}

#[test]
fn capture_returns_the_dirtied_pages_and_clears_the_log() {
    // 8 MiB/s: 2048 pages/s over 1 MiB of memory (240 data pages).
    let Some(vm) = vm_or_skip(dirtying(1 << 20, 8 << 20)) else {
        return;
    };
    assert_eq!(vm.pages(), 256);
    vm.start().unwrap();
    assert!(vm.wait_for_counter(1000, EVENT_BOUND));
    std::thread::sleep(Duration::from_millis(100));
    let first = vm.capture(false, EVENT_BOUND).unwrap();
    println!(
        "first capture: {} pages, counter {}, pause {:?}",
        first.pages.len(),
        first.counter,
        first.pause
    );
    assert!(first.pages.len() > 10, "{} pages", first.pages.len());
    assert_eq!(first.data.len(), first.pages.len() * PAGE_SIZE);
    assert!(first.pages.windows(2).all(|w| w[0] < w[1]), "ascending");
    for (i, &page) in first.pages.iter().enumerate() {
        assert!(
            (FIRST_DATA_PAGE..vm.pages()).contains(&page),
            "page {page} is outside the data area"
        );
        let value = u64::from(word(&first.data, i));
        assert!(
            value > 0 && value <= first.counter,
            "page {page} holds {value}, the counter was {}",
            first.counter
        );
    }
    // Captured with the last I/O instruction completed: right after the `out` (rip 0x1007) the
    // counter's low half is in eax; right after the `in` (rip 0x100f), in ebx (eax holds the
    // page count).
    let (regs, low) = (&first.vcpu.regs, first.counter & 0xffff_ffff);
    assert!(
        (regs.rip == 0x1007 && regs.rax == low) || (regs.rip == 0x100f && regs.rbx == low),
        "rip {:#x} rax {} rbx {}, counter {}",
        regs.rip,
        regs.rax,
        regs.rbx,
        first.counter
    );

    let second = vm.capture(false, EVENT_BOUND).unwrap();
    println!("second capture right after: {} pages", second.pages.len());
    assert!(
        second.pages.len() * 4 < first.pages.len(),
        "the log was not cleared: {} then {} pages",
        first.pages.len(),
        second.pages.len()
    );
    assert!(second.counter >= first.counter);
    // The guest runs on after captures.
    assert!(vm.wait_for_counter(second.counter + 1000, EVENT_BOUND));
}

#[test]
fn capture_of_a_guest_that_does_not_run_times_out_and_never_runs_late() {
    let Some(vm) = vm_or_skip(dirtying(1 << 20, 0)) else {
        return;
    };
    let timeout = Duration::from_millis(100);
    let t0 = Instant::now();
    let err = vm.capture(true, timeout).unwrap_err();
    assert!(t0.elapsed() < timeout + Duration::from_secs(2));
    assert!(matches!(err, KvmDummyError::NotRunning(_)), "{err:?}");
    assert!(err.to_string().contains("must be running"), "{err}");
    // The withdrawn job does not run at the first entry: the guest starts as usual, and a new
    // capture gets its own result.
    vm.start().unwrap();
    assert!(vm.wait_for_counter(100, EVENT_BOUND));
    let c = vm.capture(false, EVENT_BOUND).unwrap();
    assert!(c.counter >= 100);
    // A paused guest is not captured either.
    vm.pause().unwrap();
    assert!(matches!(
        vm.capture(false, timeout),
        Err(KvmDummyError::NotRunning(_))
    ));
    vm.start().unwrap();
    let c = vm.capture(true, EVENT_BOUND).unwrap();
    // Without dirtying, only the code page holds anything.
    assert_eq!(c.pages, vec![1]);
}

#[test]
fn capture_needs_the_dirty_log() {
    let Some(vm) = vm_or_skip(DummyVmConfig::default()) else {
        return;
    };
    vm.start().unwrap();
    let err = vm.capture(false, EVENT_BOUND).unwrap_err();
    assert!(matches!(err, KvmDummyError::NoDirtyLog), "{err:?}");
    assert!(matches!(
        vm.clear_dirty_log(),
        Err(KvmDummyError::NoDirtyLog)
    ));
}

#[test]
fn restored_guest_continues_counter_and_memory() {
    let cfg = dirtying(1 << 20, 8 << 20);
    let Some(a) = vm_or_skip(cfg) else { return };
    a.start().unwrap();
    assert!(a.wait_for_counter(5000, EVENT_BOUND));
    std::thread::sleep(Duration::from_millis(50));
    let cap = a.capture(true, EVENT_BOUND).unwrap();
    assert!(cap.pages.contains(&1), "the code page is in a full capture");
    assert!(cap.pages.len() > 2);

    let b = DummyVm::with_config(cfg).unwrap();
    // Through the serialized form, as it would travel.
    let vcpu = vmm_takeover_guest::VcpuState::from_bytes(&cap.vcpu.to_bytes()).unwrap();
    b.apply(true, &cap.pages, &cap.data, Some(&vcpu), cap.counter)
        .unwrap();
    assert_eq!(b.counter(), cap.counter, "reported at once, before start");
    let mut page = [0u8; PAGE_SIZE];
    for (i, &index) in cap.pages.iter().enumerate() {
        assert!(b.read_page(index, &mut page).unwrap());
        assert_eq!(&page[..], &cap.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
    }
    // A page the capture did not hold is zero.
    let missing = (0..b.pages()).find(|p| !cap.pages.contains(p)).unwrap();
    assert!(!b.read_page(missing, &mut page).unwrap());

    b.start().unwrap();
    b.wait_first_exit(EVENT_BOUND).unwrap();
    assert!(
        b.counter() > cap.counter,
        "{} <= {}",
        b.counter(),
        cap.counter
    );
    assert!(b.wait_for_counter(cap.counter + 1000, EVENT_BOUND));
    assert_eq!(b.failure(), None);
    let err = b
        .apply(false, &[], &[], Some(&vcpu), cap.counter)
        .unwrap_err();
    assert!(matches!(err, KvmDummyError::AlreadyStarted), "{err:?}");
    assert!(err.to_string().contains("never run"), "{err}");
}

#[test]
fn apply_checks_its_input_and_reset_restores_the_fresh_image() {
    let Some(vm) = vm_or_skip(dirtying(1 << 20, 0)) else {
        return;
    };
    let pages = vm.pages();
    let err = vm
        .apply(false, &[pages], &[0; PAGE_SIZE], None, 0)
        .unwrap_err();
    assert!(
        matches!(err, KvmDummyError::PageOutOfRange { index, pages: p } if index == pages && p == pages),
        "{err:?}"
    );
    let err = vm.apply(false, &[20], &[0; 10], None, 0).unwrap_err();
    assert!(
        matches!(err, KvmDummyError::CheckpointSize { .. }),
        "{err:?}"
    );
    let mut page = [0u8; PAGE_SIZE];
    assert!(vm.read_page(pages, &mut page).is_err());

    vm.apply(false, &[20], &[7; PAGE_SIZE], None, 0).unwrap();
    assert!(vm.read_page(20, &mut page).unwrap());
    assert_eq!(page, [7; PAGE_SIZE]);
    assert_eq!(vm.counter(), 0, "no vCPU state: the counter is untouched");
    vm.apply(true, &[], &[], None, 0).unwrap();
    assert!(!vm.read_page(20, &mut page).unwrap());
    assert!(vm.read_page(1, &mut page).unwrap(), "the code is back");
    // The guest runs from its fresh image.
    vm.start().unwrap();
    assert!(vm.wait_for_counter(100, EVENT_BOUND));
}

#[test]
fn start_waits_for_a_running_apply() {
    let cfg = dirtying(64 << 20, 0);
    let Some(vm) = vm_or_skip(cfg) else { return };
    let pages: Vec<u32> = (16..vm.pages()).collect();
    let data = vec![1u8; pages.len() * PAGE_SIZE];
    let applier = vm.clone();
    let t = std::thread::spawn(move || applier.apply(true, &pages, &data, None, 0));
    // Either order is fine, but never both half-way: after start the apply is refused or done.
    let started = vm.start();
    let applied = t.join().unwrap();
    started.unwrap();
    match applied {
        Ok(()) => {
            let mut page = [0u8; PAGE_SIZE];
            assert!(vm.read_page(vm.pages() - 1, &mut page).unwrap());
            assert_eq!(page[100], 1);
        }
        Err(KvmDummyError::AlreadyStarted) => {}
        Err(e) => panic!("{e}"),
    }
    assert!(vm.wait_for_counter(100, EVENT_BOUND));
}

#[test]
fn bad_memory_sizes_are_refused_with_the_allowed_range() {
    for mem_size in [0, 4096, (1 << 20) + 1, (4 << 30) + 4096] {
        let err = DummyVm::with_config(DummyVmConfig {
            mem_size,
            ..DummyVmConfig::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, KvmDummyError::BadMemSize { size, .. } if size == mem_size),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("multiple of 4096"), "{msg}");
        assert!(msg.contains("128 KiB") && msg.contains("4 GiB"), "{msg}");
    }
}

#[test]
fn capture_pause_of_a_64_mib_guest() {
    // ~1 MiB (256 pages) dirtied between captures 100 ms apart: 10 MiB/s.
    let Some(vm) = vm_or_skip(dirtying(64 << 20, 10 << 20)) else {
        return;
    };
    vm.start().unwrap();
    assert!(vm.wait_for_counter(1000, EVENT_BOUND));
    vm.capture(false, EVENT_BOUND).unwrap();
    let mut pauses = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let c = vm.capture(false, EVENT_BOUND).unwrap();
        pauses.push((c.pages.len(), c.pause));
    }
    let full = vm.capture(true, EVENT_BOUND).unwrap();
    println!("capture pauses, 64 MiB guest at 10 MiB/s, every 100 ms (pages, pause): {pauses:?}");
    println!(
        "full capture of the 64 MiB guest: {} pages in {:?}",
        full.pages.len(),
        full.pause
    );
    assert!(pauses.iter().all(|&(n, _)| n > 0));
    assert!(!matches!(vm.pause(), Err(GuestStateError::PauseTimeout(_))));
}

#[test]
fn capture_and_pause_leaves_the_guest_exactly_in_the_captured_state() {
    let Some(vm) = vm_or_skip(dirtying(1 << 20, 8 << 20)) else {
        return;
    };
    vm.start().unwrap();
    assert!(vm.wait_for_counter(1000, EVENT_BOUND));
    let c = vm.capture_and_pause(EVENT_BOUND).unwrap();
    assert!(!vm.is_running());
    // Not one more guest exit after the capture: the state captured is the state left.
    let exits = vm.exits();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.counter(), c.counter);
    assert_eq!(vm.exits(), exits);
    // A paused guest is not captured again (nothing would run the job): it times out.
    assert!(matches!(
        vm.capture(false, Duration::from_millis(50)),
        Err(KvmDummyError::NotRunning(_))
    ));
    // Resumed, it carries on from there.
    assert!(vm.start().unwrap());
    assert!(vm.wait_for_counter(c.counter + 1000, EVENT_BOUND));
}
