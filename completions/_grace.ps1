
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'grace' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'grace'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'grace' {
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Bind the sockets and run COMMAND on them, restarting it in place on SIGUSR2')
            [CompletionResult]::new('restart', 'restart', [CompletionResultType]::ParameterValue, 'Restart the running grace and wait for the outcome: exit 0 once the new generation serves, 1 with the reason when it was rolled back')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show the running grace''s generations, PIDs, states, listen addresses and last restart')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Stop the running grace gracefully and wait until it has exited')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Print a shell completion script (bash, zsh, fish, elvish, powershell) or the man page (man)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'grace;run' {
            [CompletionResult]::new('-l', '-l', [CompletionResultType]::ParameterName, 'A socket to bind and pass to the server, [NAME=]ADDR: `:8080`, `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, `tcp4://…`, `tcp6://…`, `udp://:5353`, `unix:/run/app.sock`, `unix:@abstract`, `fd:N`, `systemd`. Repeatable; the server gets them at fds 3, 4, … in this order')
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'A socket to bind and pass to the server, [NAME=]ADDR: `:8080`, `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, `tcp4://…`, `tcp6://…`, `udp://:5353`, `unix:/run/app.sock`, `unix:@abstract`, `fd:N`, `systemd`. Repeatable; the server gets them at fds 3, 4, … in this order')
            [CompletionResult]::new('--ready', '--ready', [CompletionResultType]::ParameterName, 'When a new generation counts as ready: auto, notify, delay:DURATION, http:PATH, tcp or exec:COMMAND')
            [CompletionResult]::new('--ready-timeout', '--ready-timeout', [CompletionResultType]::ParameterName, 'Roll a new generation back if it is not ready within this time')
            [CompletionResult]::new('--stop-signal', '--stop-signal', [CompletionResultType]::ParameterName, 'The signal that asks a generation to drain and exit (TERM, SIGQUIT, 15, …)')
            [CompletionResult]::new('--drain-timeout', '--drain-timeout', [CompletionResultType]::ParameterName, 'How long a draining generation may take before its whole process group gets SIGKILL')
            [CompletionResult]::new('--idle-wait', '--idle-wait', [CompletionResultType]::ParameterName, 'After traffic moved to a new generation, wait up to this long for the old one to close the connections it accepted before sending it the stop signal (0: do not wait)')
            [CompletionResult]::new('--on-crash', '--on-crash', [CompletionResultType]::ParameterName, 'What to do when the current generation dies on its own')
            [CompletionResult]::new('--max-draining', '--max-draining', [CompletionResultType]::ParameterName, 'At most this many generations draining at once; the oldest is killed first')
            [CompletionResult]::new('--pid-file', '--pid-file', [CompletionResultType]::ParameterName, 'Write grace''s PID here (atomically); removed on exit')
            [CompletionResult]::new('--control', '--control', [CompletionResultType]::ParameterName, 'Also accept restart/status/stop requests on this Unix socket (mode 0600, same user or root)')
            [CompletionResult]::new('--status-file', '--status-file', [CompletionResultType]::ParameterName, 'Keep this file up to date with the status as JSON (rewritten atomically on every change)')
            [CompletionResult]::new('--compat', '--compat', [CompletionResultType]::ParameterName, 'Also set the environment another tool''s servers expect (repeatable)')
            [CompletionResult]::new('--backlog', '--backlog', [CompletionResultType]::ParameterName, 'Listen backlog [default: the system''s somaxconn]')
            [CompletionResult]::new('--socket-mode', '--socket-mode', [CompletionResultType]::ParameterName, 'File mode for unix socket files, in octal (e.g. 660)')
            [CompletionResult]::new('--inject', '--inject', [CompletionResultType]::ParameterName, 'For servers that bind their own port: a seccomp filter in every generation hands a server that binds a --listen address its generation''s socket instead, whatever the binary (Go, static, musl); nothing is added to its environment. Where grace lacks CAP_SYS_ADMIN (a user other than root, or root in a container) the server runs with no_new_privs, which the kernel then requires for the filter. Needs Linux 5.9: `auto` says so and runs without it on older kernels, `always` refuses to start')
            [CompletionResult]::new('--no-listen-pid', '--no-listen-pid', [CompletionResultType]::ParameterName, 'Do not set LISTEN_PID (for servers started through a wrapper that does not `exec`)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            break
        }
        'grace;restart' {
            [CompletionResult]::new('--control', '--control', [CompletionResultType]::ParameterName, 'The control socket that `grace run --control PATH` created')
            [CompletionResult]::new('--pid-file', '--pid-file', [CompletionResultType]::ParameterName, 'The pid file that `grace run --pid-file PATH` wrote')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'Give up waiting for the answer after this long')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'grace;status' {
            [CompletionResult]::new('--control', '--control', [CompletionResultType]::ParameterName, 'The control socket that `grace run --control PATH` created')
            [CompletionResult]::new('--pid-file', '--pid-file', [CompletionResultType]::ParameterName, 'The pid file that `grace run --pid-file PATH` wrote')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'Give up waiting for the answer after this long')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the status as JSON (the same object as `--status-file`)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'grace;stop' {
            [CompletionResult]::new('--control', '--control', [CompletionResultType]::ParameterName, 'The control socket that `grace run --control PATH` created')
            [CompletionResult]::new('--pid-file', '--pid-file', [CompletionResultType]::ParameterName, 'The pid file that `grace run --pid-file PATH` wrote')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'Give up waiting for the answer after this long')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'grace;completions' {
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            break
        }
        'grace;help' {
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Bind the sockets and run COMMAND on them, restarting it in place on SIGUSR2')
            [CompletionResult]::new('restart', 'restart', [CompletionResultType]::ParameterValue, 'Restart the running grace and wait for the outcome: exit 0 once the new generation serves, 1 with the reason when it was rolled back')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show the running grace''s generations, PIDs, states, listen addresses and last restart')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Stop the running grace gracefully and wait until it has exited')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Print a shell completion script (bash, zsh, fish, elvish, powershell) or the man page (man)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'grace;help;run' {
            break
        }
        'grace;help;restart' {
            break
        }
        'grace;help;status' {
            break
        }
        'grace;help;stop' {
            break
        }
        'grace;help;completions' {
            break
        }
        'grace;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
