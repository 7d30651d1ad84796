
use builtin;
use str;

set edit:completion:arg-completer[grace] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'grace'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'grace'= {
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
            cand run 'Bind the sockets and run COMMAND on them, restarting it in place on SIGUSR2'
            cand restart 'Restart the running grace and wait for the outcome: exit 0 once the new generation serves, 1 with the reason when it was rolled back'
            cand status 'Show the running grace''s generations, PIDs, states, listen addresses and last restart'
            cand stop 'Stop the running grace gracefully and wait until it has exited'
            cand completions 'Print a shell completion script (bash, zsh, fish, elvish, powershell) or the man page (man)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'grace;run'= {
            cand -l 'A socket to bind and pass to the server, [NAME=]ADDR: `:8080`, `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, `tcp4://…`, `tcp6://…`, `udp://:5353`, `unix:/run/app.sock`, `unix:@abstract`, `fd:N`, `systemd`. Repeatable; the server gets them at fds 3, 4, … in this order'
            cand --listen 'A socket to bind and pass to the server, [NAME=]ADDR: `:8080`, `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, `tcp4://…`, `tcp6://…`, `udp://:5353`, `unix:/run/app.sock`, `unix:@abstract`, `fd:N`, `systemd`. Repeatable; the server gets them at fds 3, 4, … in this order'
            cand --ready 'When a new generation counts as ready: auto, notify, delay:DURATION, http:PATH, tcp or exec:COMMAND'
            cand --ready-timeout 'Roll a new generation back if it is not ready within this time'
            cand --stop-signal 'The signal that asks a generation to drain and exit (TERM, SIGQUIT, 15, …)'
            cand --drain-timeout 'How long a draining generation may take before its whole process group gets SIGKILL'
            cand --idle-wait 'After traffic moved to a new generation, wait up to this long for the old one to close the connections it accepted before sending it the stop signal (0: do not wait)'
            cand --on-crash 'What to do when the current generation dies on its own'
            cand --max-draining 'At most this many generations draining at once; the oldest is killed first'
            cand --pid-file 'Write grace''s PID here (atomically); removed on exit'
            cand --control 'Also accept restart/status/stop requests on this Unix socket (mode 0600, same user or root)'
            cand --status-file 'Keep this file up to date with the status as JSON (rewritten atomically on every change)'
            cand --compat 'Also set the environment another tool''s servers expect (repeatable)'
            cand --backlog 'Listen backlog [default: the system''s somaxconn]'
            cand --socket-mode 'File mode for unix socket files, in octal (e.g. 660)'
            cand --inject 'For servers that bind their own port: a seccomp filter in every generation hands a server that binds a --listen address its generation''s socket instead, whatever the binary (Go, static, musl); nothing is added to its environment. Where grace lacks CAP_SYS_ADMIN (a user other than root, or root in a container) the server runs with no_new_privs, which the kernel then requires for the filter. Needs Linux 5.9: `auto` says so and runs without it on older kernels, `always` refuses to start'
            cand --no-listen-pid 'Do not set LISTEN_PID (for servers started through a wrapper that does not `exec`)'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
        }
        &'grace;restart'= {
            cand --control 'The control socket that `grace run --control PATH` created'
            cand --pid-file 'The pid file that `grace run --pid-file PATH` wrote'
            cand --timeout 'Give up waiting for the answer after this long'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'grace;status'= {
            cand --control 'The control socket that `grace run --control PATH` created'
            cand --pid-file 'The pid file that `grace run --pid-file PATH` wrote'
            cand --timeout 'Give up waiting for the answer after this long'
            cand --json 'Print the status as JSON (the same object as `--status-file`)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'grace;stop'= {
            cand --control 'The control socket that `grace run --control PATH` created'
            cand --pid-file 'The pid file that `grace run --pid-file PATH` wrote'
            cand --timeout 'Give up waiting for the answer after this long'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'grace;completions'= {
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
        }
        &'grace;help'= {
            cand run 'Bind the sockets and run COMMAND on them, restarting it in place on SIGUSR2'
            cand restart 'Restart the running grace and wait for the outcome: exit 0 once the new generation serves, 1 with the reason when it was rolled back'
            cand status 'Show the running grace''s generations, PIDs, states, listen addresses and last restart'
            cand stop 'Stop the running grace gracefully and wait until it has exited'
            cand completions 'Print a shell completion script (bash, zsh, fish, elvish, powershell) or the man page (man)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'grace;help;run'= {
        }
        &'grace;help;restart'= {
        }
        &'grace;help;status'= {
        }
        &'grace;help;stop'= {
        }
        &'grace;help;completions'= {
        }
        &'grace;help;help'= {
        }
    ]
    $completions[$command]
}
