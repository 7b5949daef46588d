//! What first touching fresh memory costs on this machine: maps 64 MiB, touches one byte in
//! every 4 KiB page, with and without transparent huge pages, a few times over. On a virtual
//! machine the figure depends on whether the host backs the guest's memory at that moment,
//! which is why `plan`'s absolute times move with the host (README, Performance).
//!
//!   cargo run --release --example fresh_memory [ROUNDS=5]

use std::time::Instant;

const SIZE: usize = 64 << 20;
const HUGE: usize = 2 << 20;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    for round in 1..=rounds {
        for huge in [false, true] {
            match touch(huge) {
                Some(ms) => println!(
                    "round {round}: 64 MiB touched in {ms:7.2} ms ({:.3} ms per MiB), {}",
                    ms / 64.0,
                    if huge {
                        "transparent huge pages"
                    } else {
                        "4 KiB pages"
                    }
                ),
                None => println!("round {round}: mmap failed"),
            }
        }
    }
}

/// Milliseconds to touch every page of a fresh mapping, unmapped afterwards.
#[allow(unsafe_code)]
fn touch(huge: bool) -> Option<f64> {
    // SAFETY: an anonymous private mapping of SIZE + HUGE bytes, used only inside it and
    // unmapped before returning.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            SIZE + HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            return None;
        }
        // Aligned to a huge page, so each 2 MiB can be one.
        let start = (base as usize).div_ceil(HUGE) * HUGE;
        let region = start as *mut u8;
        libc::madvise(
            region.cast(),
            SIZE,
            if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            },
        );
        let began = Instant::now();
        for offset in (0..SIZE).step_by(4096) {
            region.add(offset).write_volatile(1);
        }
        let ms = began.elapsed().as_secs_f64() * 1000.0;
        libc::munmap(base, SIZE + HUGE);
        Some(ms)
    }
}
