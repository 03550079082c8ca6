package main

import (
	"bufio"
	"io"
	"net"
	"testing"
	"time"
)

// peerConn is one end of an in-memory connection that says which vsock peer it comes from.
type peerConn struct {
	net.Conn
	peer vsockAddr
}

func (c peerConn) RemoteAddr() net.Addr { return c.peer }

// fakeListener hands out prepared connections, as accept(2) on AF_VSOCK would.
type fakeListener struct{ conns chan net.Conn }

func (l fakeListener) Accept() (net.Conn, error) {
	c, ok := <-l.conns
	if !ok {
		return nil, io.EOF
	}
	return c, nil
}
func (l fakeListener) Close() error   { return nil }
func (l fakeListener) Addr() net.Addr { return vsockAddr{vmaddrCIDAny, 52} }

// dial makes a connection from the given peer CID and returns the client's end.
func dial(l fakeListener, cid uint32) net.Conn {
	client, server := net.Pipe()
	l.conns <- peerConn{server, vsockAddr{cid, 1024}}
	return client
}

// A process inside the guest (peer CID 1, VMADDR_CID_LOCAL through vsock loopback, or the
// guest's own CID) must get no answer at all, even to a request for root; the host (CID 2) does.
func TestOnlyTheHostIsServed(t *testing.T) {
	l := fakeListener{make(chan net.Conn)}
	go func() {
		ln := hostOnly{l}
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go handleConn(conn)
		}
	}()
	defer close(l.conns)
	for _, cid := range []uint32{1, 3, vmaddrCIDAny} {
		c := dial(l, cid)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		go c.Write([]byte(`{"op":"exec","argv":["id","-u"],"user":"root"}` + "\n"))
		if line, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			t.Fatalf("peer CID %d was answered: %q", cid, line)
		} else if err != io.EOF {
			t.Fatalf("peer CID %d: want the connection closed, got %v", cid, err)
		}
	}
	host := dial(l, vmaddrCIDHost)
	defer host.Close()
	host.SetDeadline(time.Now().Add(10 * time.Second))
	go host.Write([]byte(`{"op":"ping"}` + "\n"))
	line, err := bufio.NewReader(host).ReadString('\n')
	if err != nil || len(line) == 0 || line[:10] != `{"ok":true` {
		t.Fatalf("the host was not served: %q %v", line, err)
	}
}
