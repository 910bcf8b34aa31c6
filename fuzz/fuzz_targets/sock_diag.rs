//! The sock_diag (netlink) side of the kernel probes: `roomcast_ebpf::sock_diag`.
//!
//! Input: `mode`, then bytes.
//! - mode even: a received batch, `seq` (4 bytes) then the bytes as `recv` left them:
//!   `parse_batch` must not panic, whatever the lengths and the error codes say.
//! - mode odd: a list of ports (2 bytes each, at most 64): the inet_diag bytecode that
//!   `port_filter` builds is run by a model of the kernel's interpreter (`inet_diag_bc_run`,
//!   net/ipv4/inet_diag.c) and must accept exactly those local ports; the dump request around
//!   it must be consistent (lengths, alignment).
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_ebpf::sock_diag::{dump_request, parse_batch, port_filter};

const INET_DIAG_BC_NOP: u8 = 0;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;

/// The kernel's `inet_diag_bc_run` for the ops `port_filter` uses: each op is `code, yes
/// (u8), no (u16)`; a true test advances by `yes`, a false one by `no`; `JMP` is always
/// false; `S_EQ` compares the local port with the `no` field of the next op. Accept when the
/// program ends exactly at its end. (The kernel's audit refuses programs whose jumps do not
/// land on an op or the end; `None` here.)
fn run(bc: &[u8], sport: u16) -> Option<bool> {
    let mut at = 0usize;
    let mut len = bc.len() as isize;
    while len > 0 {
        let op = bc.get(at..at + 4)?;
        let (code, yes, no) = (op[0], usize::from(op[1]), usize::from(u16::from_ne_bytes([op[2], op[3]])));
        let ok = match code {
            INET_DIAG_BC_NOP => true,
            INET_DIAG_BC_JMP => false,
            INET_DIAG_BC_S_EQ => {
                let arg = bc.get(at + 4..at + 8)?;
                u16::from_ne_bytes([arg[2], arg[3]]) == sport
            }
            _ => return None,
        };
        let step = if ok { yes } else { no };
        if step < 4 || step % 4 != 0 {
            return None;
        }
        at += step;
        len -= step as isize;
    }
    Some(len == 0)
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    if mode % 2 == 0 {
        let [a, b, c, d, buf @ ..] = rest else { return };
        let seq = u32::from_ne_bytes([*a, *b, *c, *d]);
        let _ = parse_batch(buf, seq, |s| {
            let _ = (s.state, s.sport, s.dport, s.dst, s.rqueue, s.wqueue, s.cookie, s.total_retrans);
        });
        return;
    }
    let ports: Vec<u16> = rest.chunks_exact(2).take(64).map(|p| u16::from_ne_bytes([p[0], p[1]])).collect();
    if ports.is_empty() {
        return;
    }
    let bc = port_filter(&ports);
    let probes = ports.iter().flat_map(|&p| [p, p.wrapping_add(1), p.wrapping_sub(1)]).chain([0, 80, 65535]);
    for port in probes {
        assert_eq!(run(&bc, port), Some(ports.contains(&port)), "port {port}, filter for {ports:?}: {bc:?}");
    }
    let req = dump_request(2, &ports, 7);
    assert_eq!(req.len() % 4, 0);
    assert_eq!(u32::from_ne_bytes(req[..4].try_into().unwrap()) as usize, req.len());
    // The bytecode attribute after the 16-byte header and the 56-byte inet_diag_req_v2.
    let attr_len = usize::from(u16::from_ne_bytes([req[72], req[73]]));
    assert_eq!(attr_len, 4 + bc.len());
    assert_eq!(&req[76..76 + bc.len()], &bc[..]);
});
