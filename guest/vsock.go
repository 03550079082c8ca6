package main

import (
	"errors"
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
	afVsock      = 40
	vmaddrCIDAny = 0xFFFFFFFF
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

type vsockAddr struct{ port uint32 }

func (a vsockAddr) Network() string { return "vsock" }
func (a vsockAddr) String() string  { return "vsock:" + strconv.Itoa(int(a.port)) }

type vsockConn struct {
	*os.File
	local vsockAddr
}

func (c vsockConn) LocalAddr() net.Addr  { return c.local }
func (c vsockConn) RemoteAddr() net.Addr { return vsockAddr{} }

func listenVsock(port uint32) (net.Listener, error) {
	fd, err := syscall.Socket(afVsock, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, errors.New("socket(AF_VSOCK): " + err.Error() + " (is virtio-vsock configured for this VM?)")
	}
	sa := sockaddrVM{family: afVsock, port: port, cid: vmaddrCIDAny}
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
		nfd, _, e := syscall.Syscall6(syscall.SYS_ACCEPT4, uintptr(l.fd), 0, 0, syscall.SOCK_CLOEXEC, 0, 0)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return nil, e
		}
		return vsockConn{os.NewFile(nfd, "vsock"), vsockAddr{l.port}}, nil
	}
}

func (l *vsockListener) Close() error   { return syscall.Close(l.fd) }
func (l *vsockListener) Addr() net.Addr { return vsockAddr{l.port} }
