package main

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// client talks to handleConn over an in-memory connection, exactly as a host would.
type client struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func newClient(t *testing.T) *client {
	a, b := net.Pipe()
	go handleConn(b)
	t.Cleanup(func() { a.Close() })
	return &client{t: t, conn: a, r: bufio.NewReaderSize(a, 4<<20)}
}

func (c *client) send(line string) map[string]any {
	c.t.Helper()
	c.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.conn.Write([]byte(line + "\n")); err != nil {
		c.t.Fatalf("write: %v", err)
	}
	out, err := c.r.ReadBytes('\n')
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	var reply map[string]any
	if err := json.Unmarshal(out, &reply); err != nil {
		c.t.Fatalf("reply is not JSON: %q", out)
	}
	return reply
}

func (c *client) exec(req map[string]any) map[string]any {
	req["op"] = "exec"
	if _, ok := req["cwd"]; !ok {
		req["cwd"] = os.TempDir()
	}
	data, _ := json.Marshal(req)
	return c.send(string(data))
}

func TestPing(t *testing.T) {
	r := newClient(t).send(`{"op":"ping","id":7}`)
	if r["ok"] != true || r["version"] != version || r["id"] != float64(7) {
		t.Fatalf("bad ping reply: %v", r)
	}
	if _, ok := r["uptime_ms"].(float64); !ok {
		t.Fatalf("no uptime: %v", r)
	}
}

func TestExecEchoAndStdin(t *testing.T) {
	c := newClient(t)
	r := c.exec(map[string]any{"argv": []string{"echo", "hi"}})
	if r["ok"] != true || r["stdout"] != "hi\n" || r["exit_code"] != float64(0) || r["encoding"] != "utf-8" {
		t.Fatalf("echo: %v", r)
	}
	r = c.exec(map[string]any{"argv": []string{"sh", "-c", "tr a-z A-Z; echo err >&2; exit 3"}, "stdin": "hello"})
	if r["stdout"] != "HELLO" || r["stderr"] != "err\n" || r["exit_code"] != float64(3) {
		t.Fatalf("stdin/exit code: %v", r)
	}
	r = c.exec(map[string]any{"argv": []string{"sh", "-c", "echo $FOO"}, "env": map[string]string{"FOO": "bar"}})
	if r["stdout"] != "bar\n" {
		t.Fatalf("env: %v", r)
	}
}

func TestTimeoutKillsTheWholeProcessGroup(t *testing.T) {
	c := newClient(t)
	start := time.Now()
	// The background sleep keeps stdout open: only killing the group lets the reply come back.
	r := c.exec(map[string]any{"argv": []string{"sh", "-c", "sleep 30 & sleep 30"}, "timeout_ms": 300})
	if r["timed_out"] != true || r["exit_code"] != float64(137) {
		t.Fatalf("timeout: %v", r)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatalf("timeout took %v", time.Since(start))
	}
}

func TestLargeOutputIsCappedAndBinarySurvives(t *testing.T) {
	c := newClient(t)
	r := c.exec(map[string]any{"argv": []string{"sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"}})
	if r["truncated"] != true || len(r["stdout"].(string)) != OutputCap {
		t.Fatalf("cap: truncated=%v len=%d", r["truncated"], len(r["stdout"].(string)))
	}
	r = c.exec(map[string]any{"argv": []string{"printf", "\\377\\000\\001"}})
	if r["encoding"] != "base64" {
		t.Fatalf("binary: %v", r)
	}
	got, _ := base64.StdEncoding.DecodeString(r["stdout"].(string))
	if string(got) != "\xff\x00\x01" {
		t.Fatalf("binary bytes: %q", got)
	}
	r = c.exec(map[string]any{"argv": []string{"cat"}, "stdin_base64": base64.StdEncoding.EncodeToString([]byte{0, 255})})
	got, _ = base64.StdEncoding.DecodeString(r["stdout"].(string))
	if string(got) != "\x00\xff" {
		t.Fatalf("binary stdin: %v", r)
	}
}

func TestBadRequestsGetErrorsAndTheConnectionStaysUsable(t *testing.T) {
	c := newClient(t)
	for line, want := range map[string]string{
		`{not json`:                      "malformed JSON",
		`{"op":"dance"}`:                 `unknown op "dance"`,
		`{"argv":["true"]}`:              `missing "op"`,
		`{"op":"exec"}`:                  `non-empty "argv"`,
		`{"op":"exec","argv":["/nope"]}`: "cannot start /nope",
		`{"op":"exec","argv":["true"],"cwd":"/does/not/exist"}`: "not a directory",
		`{"op":"exec","argv":["true"],"user":"mallory"}`:        "unknown user",
		`[1,2,3]`: "malformed JSON",
	} {
		r := c.send(line)
		if r["ok"] != false || !strings.Contains(r["error"].(string), want) {
			t.Errorf("%s -> %v, want error containing %q", line, r, want)
		}
	}
	if r := c.send(`{"op":"ping"}`); r["ok"] != true {
		t.Fatalf("connection unusable after errors: %v", r)
	}
}

func TestAnEmptyLineGetsAReply(t *testing.T) {
	c := newClient(t)
	if r := c.send(""); r["ok"] != false || !strings.Contains(r["error"].(string), "empty request line") {
		t.Fatalf("empty line -> %v", r)
	}
	if r := c.send(`{"op":"ping"}`); r["ok"] != true {
		t.Fatalf("unusable after an empty line: %v", r)
	}
}

// Peers that send most of a long request and then wait hold its bytes; together they may hold
// maxPending, and a further long request is refused until they finish (20 such peers once
// took 637 MB of the guest).
func TestUnfinishedRequestsOfManyPeersAreBoundedTogether(t *testing.T) {
	holders := make([]*client, 0)
	big := `{"op":"ping","pad":"` + strings.Repeat("a", maxLine-4096)
	for i := 0; i < maxPending/maxLine; i++ {
		c := newClient(t)
		done := make(chan struct{})
		go func() { c.conn.Write([]byte(big)); close(done) }() // no newline: the line stays open
		<-done
		holders = append(holders, c)
	}
	late := newClient(t)
	go late.conn.Write([]byte(big + "\"}\n"))
	late.conn.SetDeadline(time.Now().Add(30 * time.Second))
	out, err := late.r.ReadBytes('\n')
	if err != nil || !strings.Contains(string(out), "unfinished requests") {
		t.Fatalf("a request past the shared bound: %q %v", out, err)
	}
	for _, c := range holders { // the held requests end: their bytes are given back
		go c.conn.Write([]byte("\"}\n"))
		c.conn.SetDeadline(time.Now().Add(30 * time.Second))
		if out, err := c.r.ReadBytes('\n'); err != nil || !strings.Contains(string(out), `"ok":true`) {
			t.Fatalf("a held request: %q %v", out, err)
		}
	}
	if r := late.send(big + `"}`); r["ok"] != true {
		t.Fatalf("refused after the others finished: %v", r)
	}
}

func TestOverlongLineIsRejectedAndSkipped(t *testing.T) {
	c := newClient(t)
	go func() {
		c.conn.Write([]byte(`{"op":"ping","pad":"` + strings.Repeat("a", maxLine+10) + "\"}\n"))
	}()
	out, err := c.r.ReadBytes('\n')
	if err != nil || !strings.Contains(string(out), "longer than 16 MiB") {
		t.Fatalf("overlong: %q %v", out, err)
	}
	if r := c.send(`{"op":"ping"}`); r["ok"] != true {
		t.Fatalf("unusable after overlong line: %v", r)
	}
}

func TestCmdlineAndListen(t *testing.T) {
	f := t.TempDir() + "/cmdline"
	os.WriteFile(f, []byte("console=ttyS0 vulcan.port=1024 vulcan.smoke=1 quiet\n"), 0o644)
	k := readCmdline(f)
	if k["vulcan.port"] != "1024" || k["vulcan.smoke"] != "1" {
		t.Fatalf("cmdline: %v", k)
	}
	ln, port, err := listen("tcp:127.0.0.1:0", k)
	if err != nil || port == 0 {
		t.Fatalf("listen: %v", err)
	}
	ln.Close()
	if _, _, err := listen("", map[string]string{"vulcan.port": "x"}); err == nil {
		t.Fatal("bad vulcan.port accepted")
	}
	if _, _, err := listen("udp:1", k); err == nil {
		t.Fatal("bad -listen accepted")
	}
}

func TestSmokeReportsOkAndFail(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(dir+"/check.json", []byte(`["sh","-c","echo Python 3.14.7"]`), 0o644)
	if code := smoke(options{configDir: dir, poweroff: "false"}); code != 0 {
		t.Fatalf("smoke ok path returned %d", code)
	}
	os.WriteFile(dir+"/check.json", []byte(`["sh","-c","exit 4"]`), 0o644)
	if code := smoke(options{configDir: dir, poweroff: "false"}); code == 0 {
		t.Fatal("failing check reported ok")
	}
}

// running lists the processes whose command line holds token (read from /proc).
func running(token string) []string {
	var found []string
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		if data, err := os.ReadFile("/proc/" + d.Name() + "/cmdline"); err == nil && strings.Contains(string(data), token) {
			found = append(found, d.Name())
		}
	}
	return found
}

// gone waits (bounded) until no process holds token; an escaped one would live for minutes.
func gone(token string) []string {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if len(running(token)) == 0 {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return running(token)
}

// A grandchild that calls setsid leaves the program's process group, so killing the group
// cannot reach it: the program's own PID namespace does, on timeout and on a normal exit.
func TestSetsidGrandchildrenDoNotOutliveTheirCommand(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: the agent contains programs in a PID namespace only as root (as in a guest)")
	}
	if _, err := exec.LookPath("setsid"); err != nil {
		t.Skip("no setsid on this host")
	}
	c := newClient(t)
	for _, tc := range []struct {
		name, script string
		timeout      int
		timedOut     bool
	}{
		{"timeout", "setsid sleep %s & sleep 600", 300, true},
		{"exit", "setsid sleep %s >/dev/null 2>&1 </dev/null & exit 0", 30_000, false},
	} {
		token := strconv.FormatInt(int64(600+os.Getpid()%1000), 10) + "." + strconv.Itoa(int(time.Now().UnixNano()%1_000_000))
		r := c.exec(map[string]any{"argv": []string{"sh", "-c", fmt.Sprintf(tc.script, token)}, "timeout_ms": tc.timeout})
		if r["ok"] != true || r["timed_out"] != tc.timedOut {
			t.Fatalf("%s: %v", tc.name, r)
		}
		if left := gone(token); left != nil {
			for _, pid := range left {
				syscall.Kill(mustAtoi(pid), syscall.SIGKILL)
			}
			t.Fatalf("%s: the setsid grandchild (sleep %s) outlived its command: pids %v", tc.name, token, left)
		}
	}
}

func mustAtoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func TestClockIsSetAtTheHostsWord(t *testing.T) {
	var got time.Time
	defer func(mode string, set func(time.Time) error) { clockMode, setRealtime = mode, set }(clockMode, setRealtime)
	setRealtime = func(t time.Time) error { got = t; return nil }
	clockMode = "true"
	host := time.Now().Add(90 * time.Second) // a clone's clock is behind: it resumed from the past
	r := newClient(t).send(fmt.Sprintf(`{"op":"clock","unix_ns":%d,"id":3}`, host.UnixNano()))
	if r["ok"] != true || r["id"] != float64(3) || !got.Equal(time.Unix(0, host.UnixNano())) {
		t.Fatalf("clock: %v (set to %v)", r, got)
	}
	if off := r["offset_ms"].(float64); off > -89000 || off < -91000 {
		t.Fatalf("offset_ms %v: want about -90000", off)
	}
	if r := newClient(t).send(`{"op":"clock"}`); r["ok"] != false || !strings.Contains(r["error"].(string), "unix_ns") {
		t.Fatalf("clock without a time: %v", r)
	}
	clockMode = "false"
	got = time.Time{}
	r = newClient(t).send(fmt.Sprintf(`{"op":"clock","unix_ns":%d}`, host.UnixNano()))
	if r["ok"] != false || !strings.Contains(r["error"].(string), "does not own") || !got.IsZero() {
		t.Fatalf("clock with -set-clock=false: %v (set to %v)", r, got)
	}
}

func TestClockOfTheHostIsLeftAloneByAnAgentItDoesNotOwn(t *testing.T) {
	if os.Getpid() == 1 || os.Getppid() == 1 {
		t.Skip("this test runs as init or its child: auto would set the clock")
	}
	defer func(set func(time.Time) error) { setRealtime = set }(setRealtime)
	setRealtime = func(time.Time) error { t.Fatal("auto set the clock of a machine it does not own"); return nil }
	r := newClient(t).send(fmt.Sprintf(`{"op":"clock","unix_ns":%d}`, time.Now().UnixNano()))
	if r["ok"] != false || !strings.Contains(r["error"].(string), "-set-clock=auto") {
		t.Fatalf("clock under auto on a host: %v", r)
	}
}

// failing is a listener whose accept always fails, as a broken transport's would.
type failing struct{ closed chan struct{} }

func (f failing) Accept() (net.Conn, error) { return nil, syscall.ECONNRESET }
func (f failing) Close() error              { close(f.closed); return nil }
func (f failing) Addr() net.Addr            { return vsockAddr{vmaddrCIDAny, 52} }

func TestAgentListensAgainWhenAcceptKeepsFailing(t *testing.T) {
	broken := failing{make(chan struct{})}
	fresh, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	go serve(broken, func() (net.Listener, error) { return fresh, nil })
	conn, err := net.DialTimeout("tcp", fresh.Addr().String(), 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintln(conn, `{"op":"ping"}`)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || !strings.Contains(line, `"ok":true`) {
		t.Fatalf("ping after the listener was made again: %q, %v", line, err)
	}
	select {
	case <-broken.closed:
	default:
		t.Fatal("the broken listener was not closed")
	}
}
