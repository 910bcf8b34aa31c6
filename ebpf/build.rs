//! Compiles the C probes in bpf/ with clang into BPF objects that the crate embeds.
//!
//! Where clang is missing the crate still builds (with an empty object and a warning): the edge
//! then reports at start-up that eBPF is unavailable and uses the sock_diag fallback.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["tcp_probes", "file_holders"];
const HEADERS: &[&str] = &["bpf/vmlinux.h", "bpf/tcp_probes.h"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=CLANG");
    for h in HEADERS {
        println!("cargo:rerun-if-changed={h}");
    }
    for name in PROGRAMS {
        let src = format!("bpf/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-D__TARGET_ARCH_x86", "-Ibpf", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{clang} failed on {src} ({s}): fix the program, or see the error above"),
            Err(e) => {
                println!(
                    "cargo:warning=cannot run {clang} ({e}): building without eBPF probes (install clang and \
                     libbpf-dev, e.g. scripts/setup.sh); the edge will use its sock_diag fallback"
                );
                std::fs::write(&obj, b"").expect("write empty object");
            }
        }
    }
}
