//! Bringing the loopback interface of a fresh network namespace up with one
//! rtnetlink request (RTM_NEWLINK, IFF_UP), so sandboxed actions can use
//! 127.0.0.1 among their own processes while having no other network.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

const RTM_NEWLINK: u16 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const IFF_UP: u32 = 1;

/// The RTM_NEWLINK message setting IFF_UP on interface `index`.
fn set_up_message(index: i32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(32);
    // struct nlmsghdr
    msg.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes()); // nlmsg_type
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes()); // nlmsg_flags
    msg.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    // struct ifinfomsg
    msg.push(0); // ifi_family: AF_UNSPEC
    msg.push(0); // padding
    msg.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    msg.extend_from_slice(&index.to_ne_bytes()); // ifi_index
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_flags
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_change
    msg
}

/// Sets `lo` up in the caller's network namespace.
pub fn loopback_up() -> Result<(), String> {
    let index =
        nix::net::if_::if_nametoindex("lo").map_err(|e| format!("finding the loopback interface: {e}"))?;
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| format!("opening a netlink socket: {e}"))?;
    let msg = set_up_message(index as i32);
    sendto(sock.as_raw_fd(), &msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())
        .map_err(|e| format!("sending the loopback request: {e}"))?;
    let mut buf = [0u8; 512];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| format!("reading the netlink answer: {e}"))?;
    if n < 20 {
        return Err(format!("short netlink answer ({n} bytes)"));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind != NLMSG_ERROR {
        return Err(format!("unexpected netlink answer type {kind}"));
    }
    let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if code != 0 {
        return Err(format!(
            "bringing the loopback interface up failed: {}",
            nix::errno::Errno::from_raw(-code)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_layout() {
        let m = super::set_up_message(1);
        assert_eq!(m.len(), 32);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 32);
        assert_eq!(i32::from_ne_bytes([m[20], m[21], m[22], m[23]]), 1);
    }
}
