package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// maxLine bounds one request line; a longer line gets an error reply and is skipped.
const maxLine = 16 << 20

var errTooLong = errors.New("request line longer than 16 MiB")

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
		if errors.Is(err, errTooLong) {
			writeReply(w, errorReply{Error: err.Error()})
			continue
		}
		if err != nil {
			return
		}
		if len(line) == 0 {
			continue
		}
		if writeReply(w, handle(line)) != nil {
			return
		}
	}
}

func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(line)+len(chunk) > maxLine {
			for errors.Is(err, bufio.ErrBufferFull) { // skip the rest of the line
				_, err = r.ReadSlice('\n')
			}
			if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
				return nil, err
			}
			return nil, errTooLong
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
