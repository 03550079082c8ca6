package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

const (
	// OutputCap is the most of each of stdout and stderr returned; the rest is read and dropped.
	OutputCap        = 1 << 20
	defaultTimeoutMs = 30_000
	maxTimeoutMs     = 3_600_000
	sandboxUID       = 1000
	sandboxGID       = 1000
	sandboxHome      = "/work"
)

var noPidNamespace sync.Once

var defaultEnv = map[string]string{
	"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"LANG": "C.UTF-8",
}

type execReply struct {
	ID         json.RawMessage `json:"id,omitempty"`
	OK         bool            `json:"ok"`
	ExitCode   int             `json:"exit_code"`
	Signal     string          `json:"signal,omitempty"`
	Stdout     string          `json:"stdout"`
	Stderr     string          `json:"stderr"`
	Encoding   string          `json:"encoding"`
	DurationMs int64           `json:"duration_ms"`
	TimedOut   bool            `json:"timed_out"`
	Truncated  bool            `json:"truncated"`
	User       string          `json:"user"`
}

// capped keeps the first max bytes written to it and counts the rest as truncated.
type capped struct {
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (c *capped) Write(p []byte) (int, error) {
	room := c.max - c.buf.Len()
	if len(p) > room {
		c.truncated = true
		if room > 0 {
			c.buf.Write(p[:room])
		}
		return len(p), nil
	}
	c.buf.Write(p)
	return len(p), nil
}

func execute(req request) (execReply, error) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return execReply{}, errors.New(`exec needs a non-empty "argv"`)
	}
	timeout := req.TimeoutMs
	if timeout <= 0 {
		timeout = defaultTimeoutMs
	}
	if timeout > maxTimeoutMs {
		return execReply{}, fmt.Errorf("timeout_ms %d is above the maximum %d", timeout, maxTimeoutMs)
	}
	stdin := []byte(req.Stdin)
	if req.StdinBase64 != "" {
		b, err := base64.StdEncoding.DecodeString(req.StdinBase64)
		if err != nil {
			return execReply{}, fmt.Errorf("stdin_base64: %v", err)
		}
		stdin = b
	}
	cwd := req.Cwd
	if cwd == "" {
		cwd = sandboxHome
		if image.Cwd != "" {
			cwd = image.Cwd
		}
	}
	if st, err := os.Stat(cwd); err != nil || !st.IsDir() {
		return execReply{}, fmt.Errorf("cwd %s: not a directory", cwd)
	}

	cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
	cmd.Dir = cwd
	// Each program is the first process of a PID namespace of its own (when the agent is root,
	// as in every guest): when it exits or is killed, the kernel kills every process left in
	// that namespace (pid_namespaces(7)), so nothing escapes by setsid, a new process group or
	// a double fork. Chosen over a cgroup, whose cgroup.kill needs Linux >= 5.14 and a mounted
	// cgroup2 (5.10 guests have neither); a PID namespace needs only CONFIG_PID_NS. The
	// process group stays as well, for an agent that is not root (tests on a host).
	attr := &syscall.SysProcAttr{Setpgid: true}
	if os.Getuid() == 0 {
		attr.Cloneflags = syscall.CLONE_NEWPID
	}
	user := "root"
	env := map[string]string{}
	for k, v := range defaultEnv {
		env[k] = v
	}
	for k, v := range image.Env {
		env[k] = v
	}
	switch req.User {
	case "", "sandbox":
		if os.Getuid() == 0 {
			attr.Credential = &syscall.Credential{Uid: sandboxUID, Gid: sandboxGID, Groups: []uint32{}}
			user = "sandbox"
			env["HOME"], env["USER"], env["LOGNAME"] = sandboxHome, "sandbox", "sandbox"
		} else {
			user = fmt.Sprintf("uid %d", os.Getuid()) // not root: cannot switch, run as ourselves
		}
	case "root":
		if os.Getuid() != 0 {
			return execReply{}, errors.New(`"user":"root" asked for, but the agent does not run as root`)
		}
		env["HOME"], env["USER"], env["LOGNAME"] = "/root", "root", "root"
	default:
		return execReply{}, fmt.Errorf(`unknown user %q (want "sandbox" or "root")`, req.User)
	}
	for k, v := range req.Env {
		env[k] = v
	}
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		cmd.Env = append(cmd.Env, k+"="+env[k])
	}
	cmd.SysProcAttr = attr
	// A bare name is looked up in the PATH the program gets (the image's, from env.json, or the
	// default), not in the agent's own: PID 1 has none (the kernel gives init no PATH).
	if !strings.Contains(req.Argv[0], "/") {
		if found := lookPath(req.Argv[0], env["PATH"]); found != "" {
			cmd.Path, cmd.Err = found, nil
		}
	}

	// Own pipes rather than cmd.Stdout: after the child exits we kill its whole process
	// group, so a background grandchild holding a pipe cannot make us wait forever.
	outR, outW, err := os.Pipe()
	if err != nil {
		return execReply{}, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return execReply{}, err
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		return execReply{}, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	start := time.Now()
	err = cmd.Start()
	if err != nil && attr.Cloneflags != 0 && (errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EPERM)) {
		// a kernel without CONFIG_PID_NS: the process group alone, said on the console
		noPidNamespace.Do(func() {
			fmt.Fprintf(os.Stderr, "vulcan-guest: no PID namespace (%v): a program's setsid children can outlive it\n", err)
		})
		attr.Cloneflags = 0
		retry := exec.Command(cmd.Path, cmd.Args[1:]...) // a Cmd starts once, even after a failed Start
		retry.Dir, retry.Env, retry.SysProcAttr = cmd.Dir, cmd.Env, attr
		retry.Stdin, retry.Stdout, retry.Stderr = inR, outW, errW
		cmd = retry
		err = cmd.Start()
	}
	if err != nil {
		for _, f := range []*os.File{outR, outW, errR, errW, inR, inW} {
			f.Close()
		}
		return execReply{}, fmt.Errorf("cannot start %s: %v", req.Argv[0], err)
	}
	outW.Close()
	errW.Close()
	inR.Close()
	pgid := cmd.Process.Pid

	var stdout, stderr = &capped{max: OutputCap}, &capped{max: OutputCap}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); io.Copy(stdout, outR) }()
	go func() { defer wg.Done(); io.Copy(stderr, errR) }()
	go func() { inW.Write(stdin); inW.Close() }()

	var timedOut bool
	var mu sync.Mutex
	timer := time.AfterFunc(time.Duration(timeout)*time.Millisecond, func() {
		mu.Lock()
		timedOut = true
		mu.Unlock()
		syscall.Kill(-pgid, syscall.SIGKILL) // the namespace's first process: the kernel kills the rest
	})
	state, werr := cmd.Process.Wait()
	timer.Stop()
	syscall.Kill(-pgid, syscall.SIGKILL) // leftovers of the group (without a PID namespace)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second): // a process escaped the group (setsid) and holds a pipe
		outR.Close()
		errR.Close()
		<-done
	}
	outR.Close()
	errR.Close()
	if werr != nil {
		return execReply{}, fmt.Errorf("wait: %v", werr)
	}
	mu.Lock()
	defer mu.Unlock()
	reply := execReply{
		OK:         true,
		DurationMs: time.Since(start).Milliseconds(),
		TimedOut:   timedOut,
		Truncated:  stdout.truncated || stderr.truncated,
		User:       user,
	}
	ws := state.Sys().(syscall.WaitStatus)
	switch {
	case ws.Exited():
		reply.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		reply.ExitCode = 128 + int(ws.Signal())
		reply.Signal = ws.Signal().String()
	}
	o, e := stdout.buf.Bytes(), stderr.buf.Bytes()
	if utf8.Valid(o) && utf8.Valid(e) {
		reply.Encoding, reply.Stdout, reply.Stderr = "utf-8", string(o), string(e)
	} else {
		reply.Encoding = "base64"
		reply.Stdout = base64.StdEncoding.EncodeToString(o)
		reply.Stderr = base64.StdEncoding.EncodeToString(e)
	}
	return reply, nil
}

// imageConfig is what a template's image config says programs run with (/etc/vulcan/env.json,
// written at build time from the OCI config's Env and WorkingDir); Alpine images have none.
type imageConfig struct {
	Env map[string]string `json:"env"`
	Cwd string            `json:"cwd"`
}

var image imageConfig

func loadImageConfig(dir string) {
	data, err := os.ReadFile(dir + "/env.json")
	if err != nil {
		return
	}
	var c imageConfig
	if err := json.Unmarshal(data, &c); err != nil {
		fmt.Fprintf(os.Stderr, "vulcan-guest: %s/env.json: %v (ignored)\n", dir, err)
		return
	}
	image = c
}

// lookPath is exec.LookPath in a given PATH: the first regular executable file named name.
func lookPath(name, path string) string {
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}
