from server.app.main import main

main()
