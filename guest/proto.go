package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// maxLine bounds one request line; a longer line gets an error reply and is skipped.
const maxLine = 16 << 20

// maxPending bounds the bytes of unfinished request lines held by all connections together:
// 20 peers each sending 16 MiB without a newline once held 637 MB of a guest's memory.
const maxPending = 4 * maxLine

var (
	errTooLong = errors.New("request line longer than 16 MiB")
	errBusy    = errors.New("the agent holds 64 MiB of unfinished requests already: request refused, send it again later")
	errEmpty   = errors.New(`empty request line (want a JSON object with "op")`)
)

// pending counts the bytes of request lines read but not yet answered, across connections.
var pending struct {
	sync.Mutex
	bytes int
}

// reserve takes n bytes of the shared budget; false when that would pass maxPending.
func reserve(n int) bool {
	pending.Lock()
	defer pending.Unlock()
	if pending.bytes+n > maxPending {
		return false
	}
	pending.bytes += n
	return true
}

func release(n int) {
	pending.Lock()
	pending.bytes -= n
	pending.Unlock()
}

type request struct {
	ID          json.RawMessage   `json:"id,omitempty"`
	Op          string            `json:"op"`
	Argv        []string          `json:"argv"`
	Stdin       string            `json:"stdin"`
	StdinBase64 string            `json:"stdin_base64"`
	Cwd         string            `json:"cwd"`
	Env         map[string]string `json:"env"`
	TimeoutMs   int64             `json:"timeout_ms"`
	User        string            `json:"user"`
	UnixNs      int64             `json:"unix_ns"`
}

type errorReply struct {
	ID    json.RawMessage `json:"id,omitempty"`
	OK    bool            `json:"ok"`
	Error string          `json:"error"`
}

type pingReply struct {
	ID       json.RawMessage `json:"id,omitempty"`
	OK       bool            `json:"ok"`
	Version  string          `json:"version"`
	UptimeMs int64           `json:"uptime_ms"`
	Pid      int             `json:"pid"`
}

// After this many failed accepts in a row the listener is closed and made again.
const relistenAfter = 5

// serve answers every connection, for ever. A snapshot restore resets the vsock transport: the
// connections open at the snapshot are closed (their handlers end), the listener stays
// (Firecracker docs/snapshotting/snapshot-support.md, "Vsock device reset"). Should accept
// keep failing anyway, the listener is made again with relisten rather than the agent
// going deaf in a VM nobody can log in to.
func serve(ln net.Listener, relisten func() (net.Listener, error)) {
	failures := 0
	for {
		conn, err := ln.Accept()
		if err == nil {
			failures = 0
			go handleConn(conn)
			continue
		}
		failures++
		fmt.Fprintf(os.Stderr, "vulcan-guest: accept: %v\n", err)
		if failures >= relistenAfter && relisten != nil {
			ln.Close()
			fresh, lerr := relisten()
			if lerr != nil {
				fmt.Fprintf(os.Stderr, "vulcan-guest: listening again failed: %v\n", lerr)
			} else {
				fmt.Fprintf(os.Stderr, "vulcan-guest: listening again on %v after %d failed accepts\n", fresh.Addr(), failures)
				ln, failures = fresh, 0
				continue
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// handleConn answers requests in order until the peer closes; nothing a peer sends ends the agent.
func handleConn(conn io.ReadWriteCloser) {
	defer conn.Close()
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(os.Stderr, "vulcan-guest: connection handler crashed: %v\n", r)
		}
	}()
	r := bufio.NewReaderSize(conn, 64<<10)
	w := bufio.NewWriter(conn)
	for {
		line, err := readLine(r)
		if errors.Is(err, errTooLong) || errors.Is(err, errBusy) {
			if writeReply(w, errorReply{Error: err.Error()}) != nil {
				return
			}
			continue
		}
		if err != nil {
			return
		}
		var reply any = errorReply{Error: errEmpty.Error()}
		if len(line) > 0 {
			reply = handle(line)
		}
		release(cap(line))
		if writeReply(w, reply) != nil {
			return
		}
	}
}

// readLine reads one request line; what it returns holds cap(line) bytes of the shared budget
// until the caller releases them.
func readLine(r *bufio.Reader) (line []byte, err error) {
	held := 0
	defer func() {
		if err != nil {
			release(held)
		}
	}()
	for {
		chunk, err := r.ReadSlice('\n')
		if len(line)+len(chunk) > maxLine {
			return nil, skipLine(r, err, errTooLong)
		}
		if len(line)+len(chunk) > cap(line) { // the line grows: its new room comes from the budget
			grown := make([]byte, len(line), min(2*(len(line)+len(chunk)), maxLine))
			if !reserve(cap(grown) - held) {
				return nil, skipLine(r, err, errBusy)
			}
			copy(grown, line)
			line, held = grown, cap(grown)
		}
		line = append(line, chunk...)
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			if err == io.EOF && len(line) > 0 {
				return trimEOL(line), nil
			}
			return nil, err
		}
		return trimEOL(line), nil
	}
}

// skipLine reads past the rest of a refused line; it returns why unless the connection failed meanwhile.
func skipLine(r *bufio.Reader, err error, why error) error {
	for errors.Is(err, bufio.ErrBufferFull) {
		_, err = r.ReadSlice('\n')
	}
	if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
		return err
	}
	return why
}

func trimEOL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

func writeReply(w *bufio.Writer, reply any) error {
	data, err := json.Marshal(reply)
	if err != nil {
		data = []byte(`{"ok":false,"error":"internal: cannot encode reply"}`)
	}
	if _, err := w.Write(append(data, '\n')); err != nil {
		return err
	}
	return w.Flush()
}

func handle(line []byte) any {
	var req request
	if err := json.Unmarshal(line, &req); err != nil {
		return errorReply{Error: "malformed JSON: " + err.Error()}
	}
	switch req.Op {
	case "ping":
		return pingReply{ID: req.ID, OK: true, Version: version, UptimeMs: time.Since(started).Milliseconds(), Pid: os.Getpid()}
	case "exec":
		res, err := execute(req)
		if err != nil {
			return errorReply{ID: req.ID, Error: err.Error()}
		}
		res.ID = req.ID
		return res
	case "clock":
		return setClock(req)
	case "":
		return errorReply{ID: req.ID, Error: `missing "op" (want "ping", "exec" or "clock")`}
	default:
		return errorReply{ID: req.ID, Error: fmt.Sprintf("unknown op %q (want \"ping\", \"exec\" or \"clock\")", req.Op)}
	}
}
