package main

import (
	"encoding/json"
	"fmt"
	"os"
	"syscall"
	"time"
)

// A VM restored from a snapshot resumes with the wall clock of the moment the snapshot was
// taken (every clone of it alike): the host says what time it is at the start of a session,
// {"op":"clock","unix_ns":N}, and the agent sets the guest's clock (CLOCK_REALTIME).

// clockMode is -set-clock: "auto" sets the clock only when the agent owns the machine (PID 1,
// or a child of init: inside a VM), so an agent started on a host for tests never moves the
// host's clock; "true" always; "false" never (the request is refused).
var clockMode = "auto"

// setRealtime is the system call; tests replace it.
var setRealtime = func(t time.Time) error {
	tv := syscall.NsecToTimeval(t.UnixNano())
	return syscall.Settimeofday(&tv)
}

type clockReply struct {
	ID json.RawMessage `json:"id,omitempty"`
	OK bool            `json:"ok"`
	// OffsetMs is how far the guest's clock was from the host's before it was set
	// (negative: behind), what a restored clone had inherited from its snapshot.
	OffsetMs int64 `json:"offset_ms"`
}

func setClock(req request) any {
	if req.UnixNs <= 0 {
		return errorReply{ID: req.ID, Error: `clock: "unix_ns" must be the host's time in nanoseconds since 1970`}
	}
	owned := clockMode == "true" || (clockMode == "auto" && (os.Getpid() == 1 || os.Getppid() == 1))
	if !owned {
		return errorReply{ID: req.ID, Error: fmt.Sprintf("clock: not setting the clock of a machine this agent "+
			"does not own (-set-clock=%s: only as PID 1 or a child of init, inside a VM)", clockMode)}
	}
	before := time.Now()
	if err := setRealtime(time.Unix(0, req.UnixNs)); err != nil {
		return errorReply{ID: req.ID, Error: "clock: cannot set the guest's clock: " + err.Error()}
	}
	return clockReply{ID: req.ID, OK: true, OffsetMs: before.Sub(time.Unix(0, req.UnixNs)).Milliseconds()}
}
