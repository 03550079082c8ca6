package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const childEnv = "VULCAN_GUEST_CHILD"

// supervise runs when the agent is PID 1 (no init in the image, or init=/usr/local/bin/vulcan-guest):
// it mounts what a program expects, then runs the agent as its child, restarts it if it dies,
// and reaps every zombie. Only the supervisor waits on "any child", so it never steals an exit
// status from the agent's own exec requests (those are children of the agent, not of PID 1).
func supervise() {
	mountEssentials()
	signal.Ignore(syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	for {
		cmd := exec.Command(self, os.Args[1:]...)
		cmd.Env = append(os.Environ(), childEnv+"=1")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			fmt.Fprintf(os.Stderr, "vulcan-guest: cannot start agent: %v\n", err)
			time.Sleep(time.Second)
			continue
		}
		child := cmd.Process.Pid
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, 0, nil)
			if err == syscall.EINTR {
				continue
			}
			if err != nil || pid == child {
				fmt.Fprintf(os.Stderr, "vulcan-guest: agent exited (%v); restarting\n", ws)
				time.Sleep(500 * time.Millisecond)
				break
			}
		}
	}
}

func mountEssentials() {
	mounts := []struct{ src, dir, fstype, data string }{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devtmpfs", "/dev", "devtmpfs", "mode=0755"},
		{"tmpfs", "/tmp", "tmpfs", "mode=1777"},
		{"tmpfs", "/run", "tmpfs", "mode=0755"},
	}
	for _, m := range mounts {
		os.MkdirAll(m.dir, 0o755)
		if err := syscall.Mount(m.src, m.dir, m.fstype, syscall.MS_NOSUID, m.data); err != nil && err != syscall.EBUSY {
			fmt.Fprintf(os.Stderr, "vulcan-guest: mount %s: %v\n", m.dir, err)
		}
	}
}

// smoke runs the image's runtime check and reports on the console, then stops the VM.
func smoke(opt options) int {
	code := 1
	defer func() { stopVM(opt.poweroff) }()
	data, err := os.ReadFile(opt.configDir + "/check.json")
	if err != nil {
		fmt.Printf("vulcan-smoke: fail cannot read the runtime check: %v\n", err)
		return code
	}
	var argv []string
	if err := json.Unmarshal(data, &argv); err != nil || len(argv) == 0 {
		fmt.Printf("vulcan-smoke: fail %s/check.json is not a JSON list of arguments\n", opt.configDir)
		return code
	}
	cwd := sandboxHome
	if st, err := os.Stat(cwd); err != nil || !st.IsDir() {
		cwd = "/"
	}
	res, err := execute(request{Argv: argv, Cwd: cwd, TimeoutMs: 120_000})
	switch {
	case err != nil:
		fmt.Printf("vulcan-smoke: fail %v\n", err)
	case res.TimedOut:
		fmt.Printf("vulcan-smoke: fail %s timed out\n", strings.Join(argv, " "))
	case res.ExitCode != 0:
		fmt.Printf("vulcan-smoke: fail %s exited %d: %s\n", strings.Join(argv, " "), res.ExitCode, firstLine(res.Stderr+res.Stdout))
	default:
		fmt.Printf("vulcan-smoke: ok %s | root=%s writable=%s vulcan-mounts=%s\n", firstLine(res.Stdout+res.Stderr),
			rootType(), writable("/work", "/etc"), vulcanMounts())
		code = 0
	}
	return code
}

// rootType is the file system type mounted at / (overlay on a read-only image).
func rootType() string {
	data, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "unknown"
	}
	kind := "unknown"
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[1] == "/" {
			kind = f[2] // the last mount on / is the one in use
		}
	}
	return kind
}

// vulcanMounts lists what is mounted under /.vulcan ("none" once overlay-init has detached the
// read-only root and the upper layer: a sandbox must not see either).
func vulcanMounts() string {
	data, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "unknown"
	}
	var found []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "/.vulcan") {
			found = append(found, f[1])
		}
	}
	if len(found) == 0 {
		return "none"
	}
	return strings.Join(found, ",")
}

// writable lists which of dirs accept a new file (written, read back, removed).
func writable(dirs ...string) string {
	var ok []string
	for _, d := range dirs {
		f := d + "/.vulcan-smoke"
		if os.WriteFile(f, []byte("ok"), 0o644) == nil {
			if b, err := os.ReadFile(f); err == nil && string(b) == "ok" {
				ok = append(ok, d)
			}
			os.Remove(f)
		}
	}
	if len(ok) == 0 {
		return "none"
	}
	return strings.Join(ok, ",")
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

// stopVM asks the kernel to restart: with reboot=k, Firecracker exits on the guest's reset and
// QEMU exits under -no-reboot. (A power-off needs ACPI, which microVMs usually lack.)
func stopVM(mode string) {
	should := mode == "true" || (mode == "auto" && (os.Getpid() == 1 || os.Getppid() == 1))
	if !should {
		return
	}
	syscall.Sync()
	time.Sleep(100 * time.Millisecond) // let the console drain
	if err := syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART); err != nil {
		fmt.Fprintf(os.Stderr, "vulcan-guest: reboot: %v\n", err)
	}
}
