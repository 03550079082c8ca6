package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"unsafe"
)

// AF_VSOCK with raw syscalls: the standard library has no vsock support and net.FileListener
// rejects unknown address families, so accept(2) is called directly and each connection is
// an *os.File. Layout of struct sockaddr_vm from linux/vm_sockets.h.
const (
	afVsock       = 40
	vmaddrCIDAny  = 0xFFFFFFFF
	vmaddrCIDHost = 2 // VMADDR_CID_HOST: the hypervisor's side (Firecracker's vsock device)
)

type sockaddrVM struct {
	family    uint16
	reserved1 uint16
	port      uint32
	cid       uint32
	flags     uint8
	zero      [3]uint8
}

type vsockListener struct {
	fd   int
	port uint32
}

type vsockAddr struct{ cid, port uint32 }

func (a vsockAddr) Network() string { return "vsock" }
func (a vsockAddr) String() string {
	return "vsock:" + strconv.FormatUint(uint64(a.cid), 10) + ":" + strconv.FormatUint(uint64(a.port), 10)
}

type vsockConn struct {
	*os.File
	local, remote vsockAddr
}

func (c vsockConn) LocalAddr() net.Addr  { return c.local }
func (c vsockConn) RemoteAddr() net.Addr { return c.remote }

func listenVsock(port uint32) (net.Listener, error) {
	fd, err := syscall.Socket(afVsock, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, errors.New("socket(AF_VSOCK): " + err.Error() + " (is virtio-vsock configured for this VM?)")
	}
	sa := sockaddrVM{family: afVsock, port: port, cid: vmaddrCIDAny}
	// Bound to any CID, since the guest's own CID is the host's choice; hostOnly then decides
	// who may talk to us, by the peer's CID.
	if _, _, e := syscall.Syscall(syscall.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa)); e != 0 {
		syscall.Close(fd)
		return nil, errors.New("bind(vsock): " + e.Error())
	}
	if err := syscall.Listen(fd, 16); err != nil {
		syscall.Close(fd)
		return nil, errors.New("listen(vsock): " + err.Error())
	}
	return &vsockListener{fd: fd, port: port}, nil
}

func (l *vsockListener) Accept() (net.Conn, error) {
	for {
		var peer sockaddrVM
		size := uint32(unsafe.Sizeof(peer))
		nfd, _, e := syscall.Syscall6(syscall.SYS_ACCEPT4, uintptr(l.fd), uintptr(unsafe.Pointer(&peer)),
			uintptr(unsafe.Pointer(&size)), syscall.SOCK_CLOEXEC, 0, 0)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return nil, e
		}
		remote := vsockAddr{peer.cid, peer.port}
		if peer.family != afVsock {
			remote = vsockAddr{vmaddrCIDAny, 0} // unknown peer: hostOnly refuses it
		}
		return vsockConn{os.NewFile(nfd, "vsock"), vsockAddr{vmaddrCIDAny, l.port}, remote}, nil
	}
}

// hostOnly accepts connections from the host alone (peer CID 2, VMADDR_CID_HOST). The agent
// runs as root and can run programs as root; a process inside the guest must not reach it. With
// CONFIG_VSOCKETS_LOOPBACK a guest process can connect to CID 1 (VMADDR_CID_LOCAL) or to the
// guest's own CID, and would otherwise be served like the host. Refusals are logged.
type hostOnly struct{ net.Listener }

func (l hostOnly) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if peer, ok := conn.RemoteAddr().(vsockAddr); ok && peer.cid == vmaddrCIDHost {
			return conn, nil
		}
		fmt.Fprintf(os.Stderr, "vulcan-guest: refused a connection from %v: only the host (CID %d) is served\n",
			conn.RemoteAddr(), vmaddrCIDHost)
		conn.Close()
	}
}

func (l *vsockListener) Close() error   { return syscall.Close(l.fd) }
func (l *vsockListener) Addr() net.Addr { return vsockAddr{vmaddrCIDAny, l.port} }
